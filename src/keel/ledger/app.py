"""The ledger app: ``keel serve ledger``, or ``uvicorn --factory keel.ledger.app:create_app``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from keel.core.app import ServiceSpec, create_service_app
from keel.core.platform import Platform
from keel.ledger.api import router
from keel.ledger.fast import ROUTES as FAST_ROUTES
from keel.ledger.postings import posting_committer
from keel.ledger.registration import MIGRATIONS
from keel.ledger.settings import LedgerSettings
from keel.ledger.tables import OUTBOX


@asynccontextmanager
async def ledger_workers(plat: Platform) -> AsyncIterator[None]:
    """The group committer, stopped before the engine closes."""
    settings = plat.settings
    assert isinstance(settings, LedgerSettings)
    postings = posting_committer(plat.database, plat.idempotency.store, settings.max_batch)
    postings.start()
    plat.services["postings"] = postings
    plat.add_readiness_check(postings.unready)
    try:
        yield
    finally:
        await postings.stop()


SPEC = ServiceSpec(
    name="ledger",
    title="ledger",
    description="Accounts and money: every balance always equals the sum of its entries.",
    fast_routes=FAST_ROUTES,
    routers=[router],
    migrations=MIGRATIONS,
    workers=ledger_workers,
    outbox=OUTBOX,
)


def create_app(settings: LedgerSettings | None = None) -> FastAPI:
    return create_service_app(SPEC, settings or LedgerSettings())
