"""A ledger app running in-process, with a client talking to it: for tests that need their own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from keel.ledger.app import create_app
from keel.ledger.settings import LedgerSettings


@asynccontextmanager
async def ledger_client(settings: LedgerSettings) -> AsyncIterator[httpx.AsyncClient]:
    """Run the ledger's lifespan around an unauthenticated client of it."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://ledger.test"
        ) as client,
    ):
        yield client
