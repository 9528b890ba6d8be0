"""The asyncio firehose client: the same rules as :class:`keel.firehose.Client`, one task sends.

Its own module so each client reads at once; the rules themselves live in ``_client_core``.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import httpx

from keel.firehose._client_core import (
    BATCH_PATH,
    CLOSE_TIMEOUT,
    CLOSED_UNSENT,
    Backoff,
    ClientClosed,
    ClientStats,
    Delivery,
    ErrorCallback,
    QueueFull,
    Send,
    Settings,
    Timestamp,
    auth_headers,
    encode_event,
    log,
)


class AsyncClient:
    """Async client: ``capture()`` from the event loop's thread; one task sends.

    ``capture()`` is a plain method (queueing never waits); ``flush()`` and ``close()`` are
    awaitable. Use ``async with``, or await ``close()``: no atexit hook can await. Bound
    ``flush()`` with ``asyncio.timeout`` if it must not wait out a long ``Retry-After``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.5,
        max_queue: int = 100_000,
        gzip: bool = True,
        max_retries: int = 8,
        backoff: Backoff = Backoff(),
        timeout: float = 10.0,
        send_at: bool = True,
        on_error: ErrorCallback | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = Settings(
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_queue=max_queue,
            gzip=gzip,
            max_retries=max_retries,
            backoff=backoff,
            send_at=send_at,
            on_error=on_error,
        )
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=auth_headers(api_key), timeout=timeout, transport=transport
        )
        self._timeout = timeout
        # (monotonic capture time, event fragment), oldest first.
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._in_flight = 0
        self._enqueued = 0  # events ever queued, and of those, events whose batch has settled
        self._settled = 0
        self._flushing = 0
        self._stopping = False
        self._closed = False
        # Since Python 3.10 an asyncio.Event binds to a loop on first use, not here.
        self._wake = asyncio.Event()  # the sender's plan may have changed
        self._idle = asyncio.Event()  # nothing queued, nothing in flight
        self._idle.set()
        self._batch_done = asyncio.Event()
        self._abandon = asyncio.Event()  # close() timed out: stop retrying, report the rest
        self._sender: asyncio.Task[None] | None = None

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the counts (see :class:`ClientStats`)."""
        return self._settings.books.snapshot()

    def capture(
        self,
        user_id: str,
        name: str | None = None,
        *,
        timestamp: Timestamp | None = None,
        metadata: Mapping[str, Any] | None = None,
        event_id: UUID | str | None = None,
    ) -> UUID:
        """Queue one event and return its id; see :meth:`keel.firehose.Client.capture`."""
        eid, fragment = encode_event(
            user_id, name, timestamp=timestamp, metadata=metadata, event_id=event_id
        )
        if self._stopping:
            raise ClientClosed("this firehose client is closed")
        if len(self._queue) >= self._settings.max_queue:
            raise QueueFull(f"{len(self._queue)} events are waiting to be sent")
        if self._sender is None:  # before queueing: outside a running loop this raises
            self._sender = asyncio.get_running_loop().create_task(self._send_forever())
        self._queue.append((time.monotonic(), fragment))
        self._enqueued += 1
        self._idle.clear()
        if len(self._queue) in (1, self._settings.batch_size):
            self._wake.set()
        self._settings.books.count(queued=1)
        return eid

    async def flush(self) -> None:
        """Send everything queued now and return once all of it is settled (not what is
        captured meanwhile)."""
        target = self._enqueued
        self._flushing += 1
        self._wake.set()
        try:
            while self._settled < target:
                self._batch_done.clear()
                await self._batch_done.wait()
        finally:
            self._flushing -= 1

    async def close(self, timeout: float | None = CLOSE_TIMEOUT) -> None:  # noqa: ASYNC109
        """Flush (up to ``timeout``), stop the sender, and report anything unsent as dropped.

        Takes a timeout, unlike ``flush()``: when it runs out, close still has work to do
        (reporting what is left), which a caller's cancellation would cut short.
        """
        if self._closed:
            return
        self._closed = True
        try:
            async with asyncio.timeout(timeout):
                await self.flush()
        except TimeoutError:
            self._abandon.set()
        self._stopping = True
        self._wake.set()
        if self._sender is not None:
            await asyncio.wait({self._sender}, timeout=self._timeout + 1)
            if not self._sender.done():  # an attempt outlived its own timeout: stop it
                self._sender.cancel()
                await asyncio.wait({self._sender})
        left = [fragment for _, fragment in self._queue]
        self._queue.clear()
        if left:
            self._settings.books.give_up(left, "client_closed", CLOSED_UNSENT, refused=False)
        await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _send_forever(self) -> None:
        while (batch := await self._take_batch()) is not None:
            try:
                await self._drive(self._settings.delivery(batch))
            except Exception:  # a bug must not stop all sending; the delivery reported the batch
                log.exception("firehose: the sender failed on a batch")
            finally:
                self._settled += len(batch)
                self._batch_done.set()
                self._in_flight = 0
                if not self._queue:
                    self._idle.set()

    async def _take_batch(self) -> list[bytes] | None:
        """Wait until a batch is due (full, old enough, or flushed) and take it; None to stop."""
        while True:
            if self._abandon.is_set() or (self._stopping and not self._queue):
                return None
            wait: float | None = None
            if self._queue:
                wait = self._queue[0][0] + self._settings.flush_interval - time.monotonic()
                due = self._flushing or self._stopping or wait <= 0
                if due or len(self._queue) >= self._settings.batch_size:
                    break
            self._wake.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass
        size = min(len(self._queue), self._settings.batch_size)
        self._in_flight = size
        return [self._queue.popleft()[1] for _ in range(size)]

    async def _drive(self, delivery: Delivery) -> None:
        """Run one batch's delivery, doing the I/O it asks for."""
        try:
            step = next(delivery)
            while True:
                outcome: Any
                if isinstance(step, Send):
                    try:
                        outcome = await self._http.post(
                            BATCH_PATH, content=step.body, headers=step.headers
                        )
                    except httpx.RequestError as error:
                        outcome = error
                else:
                    try:
                        async with asyncio.timeout(step.seconds):
                            await self._abandon.wait()
                        outcome = True
                    except TimeoutError:
                        outcome = False
                step = delivery.send(outcome)
        except StopIteration:
            return
        finally:
            delivery.close()  # stopped early (a cancel, a bug): it reports what it had not sent
