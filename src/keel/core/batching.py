"""Group commit: many requests' writes in one database transaction, each answered on its own.

Request handlers :meth:`~GroupCommitter.submit` an item and await its outcome. One committer
task per process drains whatever queued while its previous transaction was committing and hands
the whole batch to a synchronous ``apply`` function inside one write transaction, on a connection
the committer keeps (:class:`keel.core.database.Writer`). Each item's outcome is either its result
or the error to raise in its handler, so one refused item never spoils its neighbours.

``apply`` is synchronous on purpose: on SQLite the batch then runs without a single thread hop, and
on PostgreSQL through SQLAlchemy's greenlet bridge; the same rules serve both engines.
Nothing here makes correctness depend on being the only writer: the database's locks do that.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client import Histogram
from sqlalchemy.engine import Connection

from keel.core.database import Database
from keel.core.errors import ServiceUnavailable

log = logging.getLogger("keel.batching")

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
ApplyBatch = Callable[[Connection, list[ItemT]], Sequence[Any]]

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


@dataclass(slots=True)
class _Pending(Generic[ItemT]):
    item: ItemT
    future: asyncio.Future[Any]


class GroupCommitter(Generic[ItemT, ResultT]):
    """Commits submitted items in batches, one batch at a time per process."""

    def __init__(
        self, *, name: str, database: Database, apply: ApplyBatch[ItemT], max_batch: int = 512
    ) -> None:
        self.name = name
        self._apply = apply
        self._max_batch = max_batch
        self._queue: deque[_Pending[ItemT]] = deque()
        self._wake = asyncio.Event()
        self._writer = database.writer()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"keel-{self.name}")

    async def submit(self, item: ItemT) -> ResultT:
        """Queue ``item`` and wait for its committed result, or raise its refusal."""
        if self._closing:
            raise ServiceUnavailable("Shutting down; retry.", headers={"Retry-After": "1"})
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, future))
        self._wake.set()
        return await future

    async def stop(self) -> None:
        """Refuse new items, commit the ones already queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self._writer.close()

    async def _run(self) -> None:
        while not (self._closing and not self._queue):
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                take = min(len(self._queue), self._max_batch)
                await self._commit([self._queue.popleft() for _ in range(take)])

    async def _commit(self, batch: list[_Pending[ItemT]]) -> None:
        BATCH_SIZE.labels(self.name).observe(len(batch))
        items = [p.item for p in batch]
        try:
            with BATCH_SECONDS.labels(self.name).time():
                outcomes = await self._writer.run(lambda conn: self._apply(conn, items))
        except Exception as exc:
            log.warning("%s: batch of %d failed: %r", self.name, len(batch), exc)
            outcomes = [exc] * len(batch)
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():  # its client went away; the write stands regardless
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
