"""Group commit: many requests' writes in one database transaction, each answered on its own.

Request handlers :meth:`~GroupCommitter.submit` an item and await its outcome. One committer
task per process drains whatever queued while its previous transaction was committing and hands
the whole batch to a synchronous ``apply`` function inside one write transaction, on a connection
the committer keeps (:class:`keel.core.database.Writer`). Each item's outcome is either its result
or the error to raise in its handler, so one refused item never spoils its neighbours.

``apply`` is synchronous on purpose: on SQLite the batch then runs without a single thread hop, and
on PostgreSQL through SQLAlchemy's greenlet bridge; the same rules serve both engines.
A committer whose batches go somewhere else than SQL (a Redis buffer: one script call per batch)
passes an async ``commit(items) -> outcomes`` instead of a database and ``apply``; the queue, the
timeouts and the supervision below are the same, only the conflict retries are not.
Nothing here makes correctness depend on being the only writer: the database's locks do that.

What a client is told when writes cannot proceed:

- the queue holds ``write_queue_max`` items; past that, 503 ``overloaded`` + ``Retry-After``,
  before anything is queued or written;
- a batch the database rolled back for a deadlock or a serialization failure runs again, up to
  ``CONFLICT_RETRIES`` times, so ``apply`` must compute its outcomes afresh on every call;
- a submitted item waits at most ``write_timeout_seconds``: still queued, it is dropped (503,
  nothing written); already in a batch, its outcome is unknown (502 ``outcome_unknown``);
- if the committer task itself dies, the batch it was on is answered ``outcome_unknown``, queued
  items 503, and it is restarted after a short backoff; meanwhile :meth:`submit` fails at once
  and :meth:`unready` tells ``/ready`` why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Histogram
from sqlalchemy.engine import Connection

from keel.core.database import Database
from keel.core.errors import (
    RETRYABLE_SQLSTATES,
    DatabaseUnavailable,
    OutcomeUnknown,
    Overloaded,
    ServiceUnavailable,
    sqlstate_of,
)

log = logging.getLogger("keel.batching")

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
ApplyBatch = Callable[[Connection, list[ItemT]], Sequence[Any]]
CommitBatch = Callable[[list[ItemT]], Awaitable[Sequence[Any]]]

BATCH_SIZE = Histogram(
    "keel_group_commit_batch_size",
    "Items committed per database transaction.",
    ["committer"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BATCH_SECONDS = Histogram(
    "keel_group_commit_batch_seconds",
    "Time to apply and commit one batch.",
    ["committer"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
CONFLICT_RETRIES_TOTAL = Counter(
    "keel_group_commit_conflict_retries",
    "Batches run again after a deadlock or serialization failure rolled them back.",
    ["committer"],
)
RESTARTS_TOTAL = Counter(
    "keel_group_commit_restarts", "Committer tasks restarted after dying.", ["committer"]
)


def _retry_later(detail: str) -> ServiceUnavailable:
    return ServiceUnavailable(detail, headers={"Retry-After": "1"})


@dataclass(slots=True)
class _Pending(Generic[ItemT]):
    item: ItemT
    future: asyncio.Future[Any]
    deadline: float  # time.monotonic() past which its caller is answered without waiting more


class GroupCommitter(Generic[ItemT, ResultT]):
    """Commits submitted items in batches, one batch at a time per process."""

    CONFLICT_RETRIES = 3
    RESTART_DELAYS = (0.05, 0.25, 1.0, 5.0)  # seconds, by consecutive deaths without a commit

    def __init__(
        self,
        *,
        name: str,
        database: Database | None = None,
        apply: ApplyBatch[ItemT] | None = None,
        commit: CommitBatch[ItemT] | None = None,
        max_batch: int = 512,
        max_queue: int | None = None,
        timeout: float | None = None,
        weigh: Callable[[ItemT], int] | None = None,
        max_weight: int | None = None,
        unavailable: type[ServiceUnavailable] = DatabaseUnavailable,
    ) -> None:
        """Either ``database`` and ``apply``, or ``commit`` with ``max_queue`` and ``timeout``.

        ``unavailable`` is the error a queued item gets when it waited too long to be sent.
        """
        if (apply is None) == (commit is None) or (apply is not None and database is None):
            raise TypeError("GroupCommitter needs database + apply, or commit")
        if database is not None:
            max_queue = max_queue or database.settings.write_queue_max
            timeout = timeout or database.settings.write_timeout_seconds
        if max_queue is None or timeout is None:
            raise TypeError("GroupCommitter(commit=...) needs max_queue and timeout")
        self.name = name
        self._apply = apply
        self._commit_batch = commit
        self._unavailable = unavailable
        self._max_batch = max_batch
        # Optionally a batch also stops at max_weight by weigh(item) (say, rows): one batch is
        # one transaction, which on SQLite runs on the event loop's thread.
        self._weigh = weigh
        self._max_weight = max_weight
        self._max_queue = max_queue
        self._timeout = timeout
        self._queue: deque[_Pending[ItemT]] = deque()
        self._wake = asyncio.Event()
        self._writer = database.writer() if database is not None else None
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._batch: list[_Pending[ItemT]] = []
        self._batch_started: float | None = None
        self._down: str | None = None  # why the task is not running, between death and restart
        self._deaths = 0
        self._restart: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Items in the batch being committed now."""
        return len(self._batch)

    def start(self) -> None:
        self._down = None
        self._task = asyncio.create_task(self._run(), name=f"keel-{self.name}")
        self._task.add_done_callback(self._on_task_done)
        if self._sweeper is None:
            self._sweep()

    def unready(self) -> str | None:
        """Why writes cannot proceed now, or None: a readiness check for ``GET /ready``."""
        if self._closing:
            return f"{self.name}: shutting down"
        if self._down is not None:
            return f"{self.name}: {self._down}"
        if self._task is None:
            return f"{self.name}: not started"
        started = self._batch_started
        if started is not None and time.monotonic() - started > self._timeout:
            return f"{self.name}: a commit has been running for over {self._timeout:g}s"
        return None

    async def submit(self, item: ItemT) -> ResultT:
        """Queue ``item`` and wait for its committed result, or raise its refusal."""
        if self._closing:
            raise _retry_later("Shutting down; retry.")
        if self._down is not None:
            raise _retry_later(f"Writes are paused: {self._down}; retry.")
        if len(self._queue) >= self._max_queue:
            raise Overloaded(
                "Too many writes are queued; nothing was written; retry.",
                headers={"Retry-After": "1"},
            )
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, future, time.monotonic() + self._timeout))
        self._wake.set()
        return await future  # bounded: see _sweep

    async def stop(self) -> None:
        """Refuse new items, commit the ones already queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._restart is not None:
            self._restart.cancel()
            self._fail_queued()
        if self._task is not None:
            await asyncio.wait([self._task])
        if self._writer is not None:
            await self._writer.close()

    async def _run(self) -> None:
        while not (self._closing and not self._queue):
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._take()
                if batch:
                    await self._commit(batch)

    def _take(self) -> list[_Pending[ItemT]]:
        """The next batch, leaving out items whose callers stopped waiting while queued."""
        batch: list[_Pending[ItemT]] = []
        weight = 0
        while self._queue and len(batch) < self._max_batch:
            head = self._queue[0]
            if head.future.done():
                self._queue.popleft()
                continue
            heavy = self._weigh(head.item) if self._weigh is not None else 0
            if batch and self._max_weight is not None and weight + heavy > self._max_weight:
                break  # the next batch starts with it
            self._queue.popleft()
            batch.append(head)
            weight += heavy
        return batch

    def _sweep(self) -> None:
        """Answer every caller whose deadline has passed; runs a few times per timeout.

        One timer per committer rather than one per request: the queue is in deadline order, so
        only its head is looked at. A queued item is dropped (nothing was sent: 503, retry); an
        item in the batch being committed may still commit, so its outcome is unknown.
        """
        now = time.monotonic()
        while self._queue and self._queue[0].deadline <= now:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(
                    self._unavailable(
                        "The write waited too long to start; nothing was written; retry.",
                        headers={"Retry-After": "1"},
                    )
                )
        for pending in self._batch:
            if pending.deadline <= now and not pending.future.done():
                pending.future.set_exception(OutcomeUnknown())
        interval = min(max(self._timeout / 10, 0.05), 1.0)
        self._sweeper = asyncio.get_running_loop().call_later(interval, self._sweep)

    async def _commit(self, batch: list[_Pending[ItemT]]) -> None:
        BATCH_SIZE.labels(self.name).observe(len(batch))
        self._batch, self._batch_started = batch, time.monotonic()
        try:
            with BATCH_SECONDS.labels(self.name).time():
                outcomes = await self._apply_with_retries([p.item for p in batch])
        except Exception as exc:
            log.warning("%s: batch of %d failed: %r", self.name, len(batch), exc)
            outcomes = [exc] * len(batch)
        self._answer(batch, outcomes)
        self._batch, self._batch_started = [], None
        self._deaths = 0

    async def _apply_with_retries(self, items: list[ItemT]) -> Sequence[Any]:
        if self._commit_batch is not None:
            return await self._commit_batch(items)
        assert self._writer is not None and self._apply is not None
        apply = self._apply
        attempt = 0
        while True:
            try:
                return await self._writer.run(lambda conn: apply(conn, items))
            except Exception as exc:
                # Rolled back so that another transaction could proceed: the batch may run again.
                state = sqlstate_of(exc)
                if state not in RETRYABLE_SQLSTATES or attempt >= self.CONFLICT_RETRIES:
                    raise
                attempt += 1
                CONFLICT_RETRIES_TOTAL.labels(self.name).inc()
                log.info("%s: batch rolled back (%s), running it again", self.name, state)

    def _answer(self, batch: list[_Pending[ItemT]], outcomes: Sequence[Any]) -> None:
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():  # its client went away; the write stands regardless
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        """Supervise the committer: whatever killed it, answer everyone and start it again."""
        error = None if task.cancelled() else task.exception()
        if self._closing and error is None and not task.cancelled():
            return  # stopped as asked
        for pending in self._batch:  # it may have died before, during or after COMMIT
            if not pending.future.done():
                pending.future.set_exception(OutcomeUnknown())
        self._batch, self._batch_started = [], None
        self._fail_queued()
        if self._closing:
            return
        delay = self.RESTART_DELAYS[min(self._deaths, len(self.RESTART_DELAYS) - 1)]
        self._deaths += 1
        self._down = f"committer died ({type(error).__name__ if error else 'cancelled'})"
        log.error("%s: %s; restarting in %gs", self.name, self._down, delay, exc_info=error)
        RESTARTS_TOTAL.labels(self.name).inc()
        self._restart = asyncio.get_running_loop().call_later(delay, self._restart_now)

    def _restart_now(self) -> None:
        self._restart = None
        if not self._closing:
            self.start()

    def _fail_queued(self) -> None:
        """Answer every queued item: none of them was sent to the database."""
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(
                    _retry_later("The writer restarted before this write; nothing was written.")
                )
