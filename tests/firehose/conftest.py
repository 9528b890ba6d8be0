"""Firehose fixtures: the app in-process on each backend and buffer, with keys of each scope.

Tests that use the app run on SQLite with the direct buffer, and on PostgreSQL with the direct
buffer and with the spool (its default there). A test may pin either with
``@pytest.mark.parametrize("backend"/"firehose_buffer", [...], indirect=True)``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from keel.core.auth import Scope
from keel.firehose.app import create_app
from keel.firehose.buffers import Buffer
from keel.firehose.settings import FirehoseSettings

BACKEND_BUFFERS = [("sqlite", "direct"), ("postgres", "direct"), ("postgres", "spool")]


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Pair each backend with its buffers, as a mark (so the backend's own params step aside)."""
    if "firehose_buffer" not in metafunc.fixturenames:
        return
    pinned = {
        name.strip()
        for mark in metafunc.definition.iter_markers("parametrize")
        for name in (mark.args[0].split(",") if isinstance(mark.args[0], str) else mark.args[0])
    }
    if not pinned & {"backend", "firehose_buffer"}:
        metafunc.definition.add_marker(
            pytest.mark.parametrize(
                ("backend", "firehose_buffer"),
                BACKEND_BUFFERS,
                indirect=True,
                ids=[f"{b}-{k}" for b, k in BACKEND_BUFFERS],
            )
        )


@pytest.fixture
def firehose_buffer(request: pytest.FixtureRequest) -> str:
    """The buffer under test: ``direct`` unless the test is parametrized otherwise."""
    return str(getattr(request, "param", "direct"))


@pytest.fixture
def firehose_settings(database_url: str, tmp_path: Any, firehose_buffer: str) -> FirehoseSettings:
    return FirehoseSettings(
        database_url=database_url,
        rate_limit="100000/second",
        access_log=False,
        spool_path=tmp_path / "spool.db",
        buffer=firehose_buffer,
        flush_age_ms=20,  # the spool drains promptly: reads after a 202 wait for less
    )


@pytest.fixture
async def firehose_app(firehose_settings: FirehoseSettings) -> AsyncIterator[Any]:
    app = create_app(firehose_settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
def drained(firehose_app: Any) -> Callable[[], Awaitable[None]]:
    """Wait until the buffer holds nothing (every 202'd event is in the store), 10 s at most."""
    buffer: Buffer = firehose_app.state.platform.services["buffer"]

    async def wait() -> None:
        deadline = time.monotonic() + 10
        while (await buffer.health()).depth:
            assert time.monotonic() < deadline, "the buffer did not drain within 10 s"
            await asyncio.sleep(0.01)

    return wait


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
