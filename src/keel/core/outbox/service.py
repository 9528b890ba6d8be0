"""The outbox as a running capability: its worker, its retention job and its /health summary."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from keel.core.database import Database
from keel.core.maintenance import PeriodicJob
from keel.core.outbox import store
from keel.core.outbox.settings import WebhookSettings
from keel.core.outbox.worker import OutboxWorker


@asynccontextmanager
async def running_worker(
    database: Database, settings: WebhookSettings, service: str
) -> AsyncIterator[OutboxWorker | None]:
    """The service's webhook worker, if ``outbox_worker`` is on; stopped on the way out."""
    if not settings.outbox_worker:
        yield None
        return
    worker = OutboxWorker(database, settings, service)
    worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


def purge_job(settings: WebhookSettings, service: str) -> PeriodicJob:
    """Drop delivered deliveries, then events with nothing left to deliver, past retention."""
    retention = timedelta(hours=settings.outbox_retention_hours)

    async def delivered(conn: AsyncConnection, limit: int) -> int:
        return await store.purge_delivered(conn, service, datetime.now(UTC) - retention, limit)

    async def settled(conn: AsyncConnection, limit: int) -> int:
        cutoff = datetime.now(UTC) - retention
        return await store.purge_settled_events(conn, service, cutoff, limit)

    return PeriodicJob(name=f"{service}:outbox-purge", chunks=[delivered, settled])


class SummaryCache:
    """The outbox summary of ``/health``, read at most once a second per service and process.

    ``/health`` needs no key, and the summary runs three capped counts: without this, a flood of
    health checks would cost the database three counts each.
    """

    def __init__(self, ttl: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._entries: dict[tuple[int, str], tuple[float, dict[str, Any]]] = {}
        self._lock = asyncio.Lock()

    async def summary(self, database: Database, service: str) -> dict[str, Any]:
        key = (id(database), service)
        async with self._lock:  # concurrent checks wait for one read instead of each reading
            cached = self._entries.get(key)
            if cached is not None and self.clock() - cached[0] < self.ttl:
                return cached[1]
            async with database.read() as conn:
                summary = await store.outbox_summary(conn, service, datetime.now(UTC))
            self._entries[key] = (self.clock(), summary)
            return summary


_SUMMARIES = SummaryCache()


async def health(
    database: Database,
    worker: OutboxWorker | None,
    service: str,
    summaries: SummaryCache = _SUMMARIES,
) -> dict[str, Any]:
    """The webhook backlog and the worker's state; an error shows as its class only."""
    state: dict[str, Any] = {"worker": "disabled"}
    if worker is not None:
        state = {"worker": worker.state, "consecutive_errors": worker.consecutive_errors}
        if worker.last_error is not None:
            state["last_error"] = worker.last_error
    try:
        summary = await summaries.summary(database, service)
    except Exception as exc:  # health reports the failure rather than failing itself
        summary = {"error": type(exc).__name__}
    return {"outbox": {**summary, **state}}
