"""Firehose fixtures: the app in-process on each backend, with keys of each scope."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from keel.core.auth import Scope
from keel.firehose.app import create_app
from keel.firehose.settings import FirehoseSettings


@pytest.fixture
def firehose_settings(database_url: str, tmp_path: Any) -> FirehoseSettings:
    return FirehoseSettings(
        database_url=database_url,
        rate_limit="100000/second",
        access_log=False,
        spool_path=tmp_path / "spool.db",
        buffer="direct",
    )


@pytest.fixture
async def firehose_app(firehose_settings: FirehoseSettings) -> AsyncIterator[Any]:
    app = create_app(firehose_settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def firehose(firehose_app: Any, make_key: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A write-and-read client of the firehose in-process (an admin key: every scope)."""
    key = await make_key(Scope.ADMIN)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=firehose_app),
        base_url="http://firehose.test",
        headers={"Authorization": f"Bearer {key}"},
    ) as client:
        yield client
