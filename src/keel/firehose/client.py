"""The firehose's Python client: ``capture()`` returns at once, a background sender does the rest.

    with Client("http://127.0.0.1:8000", api_key) as firehose:
        event_id = firehose.capture("user-42", "signed_up", metadata={"plan": "pro"})

    async with AsyncClient("http://127.0.0.1:8000", api_key) as firehose:
        firehose.capture("user-42", "signed_up")
        await firehose.flush()

``capture()`` gives the event a UUIDv7 ``event_id`` (unless the caller brings one), queues it in
memory and returns the id; it never waits on the network. A background thread (``Client``) or task
(``AsyncClient``) posts gzipped batches to ``/events/batch`` when ``batch_size`` events are waiting
or the oldest has waited ``flush_interval`` seconds, stamping ``sent_at`` at each attempt.

Failures, and what becomes of the events:

* 503 (``buffer_full``, ``overloaded``...), 429, 408, other 5xx and transport errors: nothing or
  maybe something was stored; the batch is re-sent with the same ids (the server stores an id
  once), after exponential backoff with jitter, and never sooner than ``Retry-After``. After
  ``max_retries`` re-sends it is dropped and reported.
* Any other 4xx, or per-event rejections inside a 202: retrying cannot help; the events are
  reported to ``on_error(events, code, detail)`` and counted in ``stats.rejected``.
* A full queue raises :class:`QueueFull` from ``capture()``: never a silent drop, never a hang.

``flush()`` sends what is queued; ``close()`` (or leaving the ``with`` block) flushes, then stops,
and reports whatever it could not send as dropped. The sync client also closes itself at
interpreter exit (waiting up to 30 s for the queue to be sent). ``stats`` counts every event's
fate; :class:`QueueFull`, :class:`ClientClosed`, :class:`Backoff` and :class:`ClientStats` are
importable from here.
"""

from __future__ import annotations

import atexit
import collections
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import httpx

from keel.firehose._async_client import AsyncClient
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

__all__ = ["AsyncClient", "Backoff", "Client", "ClientClosed", "ClientStats", "QueueFull"]


class Client:
    """Sync client: ``capture()`` from any number of threads; one daemon thread sends."""

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
        transport: httpx.BaseTransport | None = None,
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
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=base_url, headers=auth_headers(api_key), timeout=timeout, transport=transport
        )
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._changed = threading.Condition()
        self._in_flight = 0
        self._enqueued = 0  # events ever queued, and of those, events whose batch has settled:
        self._settled = 0  # one sender, first in first out, so the first n settle first
        self._flushing = 0
        self._stopping = False
        self._closed = False
        self._abandon = threading.Event()  # close() timed out: stop retrying, report the rest
        self._sender: threading.Thread | None = None
        atexit.register(self.close)

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
        """Queue one event and return its id. Raises :class:`QueueFull` when ``max_queue``
        events are waiting, and ``ValueError``/``TypeError`` for an event that cannot be sent."""
        eid, fragment = encode_event(
            user_id, name, timestamp=timestamp, metadata=metadata, event_id=event_id
        )
        with self._changed:
            if self._stopping:
                raise ClientClosed("this firehose client is closed")
            if len(self._queue) >= self._settings.max_queue:
                raise QueueFull(f"{len(self._queue)} events are waiting to be sent")
            self._queue.append((time.monotonic(), fragment))
            self._enqueued += 1
            waiting = len(self._queue)
            if self._sender is None:
                self._sender = threading.Thread(
                    target=self._send_forever, name="keel-firehose-sender", daemon=True
                )
                self._sender.start()
            # The sender sleeps on the oldest event's deadline; only these two change its plan.
            if waiting == 1 or waiting == self._settings.batch_size:
                self._changed.notify_all()
        self._settings.books.count(queued=1)
        return eid

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued now; block until it is settled. False if ``timeout`` ran out.

        Events captured after the call (by other threads) are not waited for.
        """
        self._not_from_sender("flush")
        with self._changed:
            target = self._enqueued
            self._flushing += 1
            self._changed.notify_all()
            try:
                return self._changed.wait_for(lambda: self._settled >= target, timeout)
            finally:
                self._flushing -= 1

    def close(self, timeout: float | None = CLOSE_TIMEOUT) -> None:
        """Flush (up to ``timeout``), stop the sender, and report anything unsent as dropped."""
        self._not_from_sender("close")
        with self._changed:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        if not self.flush(timeout):
            self._abandon.set()
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._sender is not None:
            # An attempt in flight ends within the HTTP timeout; then the sender sees the stop.
            self._sender.join(self._timeout + 1)
        with self._changed:
            left = [fragment for _, fragment in self._queue]
            self._queue.clear()
        if left:
            self._settings.books.give_up(left, "client_closed", CLOSED_UNSENT, refused=False)
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _not_from_sender(self, method: str) -> None:
        """``on_error`` runs on the sender's thread, which cannot wait for itself."""
        if threading.current_thread() is self._sender:
            raise RuntimeError(f"{method}() cannot be called from on_error")

    def _send_forever(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
                self._drive(self._settings.delivery(batch))
            except Exception:  # a bug must not stop all sending; the delivery reported the batch
                log.exception("firehose: the sender failed on a batch")
            finally:
                with self._changed:
                    self._settled += len(batch)
                    self._in_flight = 0
                    self._changed.notify_all()

    def _take_batch(self) -> list[bytes] | None:
        """Wait until a batch is due (full, old enough, or flushed) and take it; None to stop."""
        interval = self._settings.flush_interval
        with self._changed:
            while True:
                if self._abandon.is_set() or (self._stopping and not self._queue):
                    return None
                if self._queue:
                    wait = self._queue[0][0] + interval - time.monotonic()
                    due = self._flushing or self._stopping or wait <= 0
                    if due or len(self._queue) >= self._settings.batch_size:
                        break
                    self._changed.wait(wait)
                else:
                    self._changed.wait()
            size = min(len(self._queue), self._settings.batch_size)
            self._in_flight = size
            return [self._queue.popleft()[1] for _ in range(size)]

    def _drive(self, delivery: Delivery) -> None:
        try:
            step = next(delivery)
            while True:
                if isinstance(step, Send):
                    try:
                        outcome: Any = self._http.post(
                            BATCH_PATH, content=step.body, headers=step.headers
                        )
                    except httpx.RequestError as error:
                        outcome = error
                else:
                    outcome = self._abandon.wait(step.seconds)
                step = delivery.send(outcome)
        except StopIteration:
            return
        finally:
            delivery.close()  # stopped early (a cancel, a bug): it reports what it had not sent
