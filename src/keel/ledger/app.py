"""The ledger app: ``keel serve ledger``, or ``uvicorn --factory keel.ledger.app:create_app``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI

from keel.core.app import Platform, ServiceSpec, create_service_app
from keel.ledger.api import router
from keel.ledger.fast import ROUTES as FAST_ROUTES
from keel.ledger.outbox import OutboxWorker
from keel.ledger.outbox_store import outbox_summary
from keel.ledger.postings import posting_committer
from keel.ledger.registration import MIGRATIONS
from keel.ledger.settings import LedgerSettings
from keel.ledger.webhooks_api import router as webhooks_router


@asynccontextmanager
async def ledger_workers(plat: Platform) -> AsyncIterator[None]:
    """The group committer and the outbox worker, both stopped before the engine closes."""
    settings = plat.settings
    assert isinstance(settings, LedgerSettings)
    postings = posting_committer(plat.database, plat.idempotency.store, settings.max_batch)
    postings.start()
    plat.services["postings"] = postings
    plat.add_readiness_check(postings.unready)
    worker = OutboxWorker(plat.database, settings) if settings.outbox_worker else None
    if worker is not None:
        worker.start()
        plat.services["outbox"] = worker
    try:
        yield
    finally:
        try:
            if worker is not None:
                await worker.stop()
        finally:
            await postings.stop()


async def ledger_health(plat: Platform) -> dict[str, Any]:
    """The webhook backlog and the outbox worker's state, for GET /health."""
    worker = plat.services.get("outbox")
    state: dict[str, Any] = {"worker": "disabled"}
    if isinstance(worker, OutboxWorker):
        state = {"worker": worker.state, "consecutive_errors": worker.consecutive_errors}
        if worker.last_error is not None:
            state["last_error"] = worker.last_error
    try:
        async with plat.database.read() as conn:
            summary = await outbox_summary(conn, datetime.now(UTC))
    except Exception as exc:  # health reports the failure rather than failing itself
        summary = {"error": type(exc).__name__}
    return {"outbox": {**summary, **state}}


SPEC = ServiceSpec(
    name="ledger",
    title="ledger",
    description="Accounts and money: every balance always equals the sum of its entries.",
    fast_routes=FAST_ROUTES,
    routers=[router, webhooks_router],
    migrations=MIGRATIONS,
    workers=ledger_workers,
    health=ledger_health,
)


def create_app(settings: LedgerSettings | None = None) -> FastAPI:
    return create_service_app(SPEC, settings or LedgerSettings())
