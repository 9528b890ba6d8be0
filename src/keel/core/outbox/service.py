"""The outbox as a running capability: its worker, its retention job and its /health summary."""

from __future__ import annotations

from collections.abc import AsyncIterator
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


async def health(database: Database, worker: OutboxWorker | None, service: str) -> dict[str, Any]:
    """The webhook backlog and the worker's state; an error shows as its class only."""
    state: dict[str, Any] = {"worker": "disabled"}
    if worker is not None:
        state = {"worker": worker.state, "consecutive_errors": worker.consecutive_errors}
        if worker.last_error is not None:
            state["last_error"] = worker.last_error
    try:
        async with database.read() as conn:
            summary = await store.outbox_summary(conn, service, datetime.now(UTC))
    except Exception as exc:  # health reports the failure rather than failing itself
        summary = {"error": type(exc).__name__}
    return {"outbox": {**summary, **state}}
