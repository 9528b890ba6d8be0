"""The firehose app (``keel serve firehose``).

Or ``uvicorn --factory keel.firehose.app:create_app``.
Also: ``make run`` serves it on port 8000 beside the other services.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from keel.core.app import ServiceSpec, create_service_app
from keel.core.fastpath import FastRoute
from keel.core.migrate import pending_migrations
from keel.core.platform import Platform
from keel.firehose import service
from keel.firehose.api import router
from keel.firehose.buffers import Buffer
from keel.firehose.registration import MIGRATIONS
from keel.firehose.settings import FirehoseSettings

log = logging.getLogger("keel.firehose")


def make_buffer(plat: Platform, settings: FirehoseSettings) -> Buffer:
    """The buffer ``KEEL_FIREHOSE_BUFFER`` names (``auto``: direct on SQLite, spool otherwise)."""
    kind = settings.buffer_kind
    if kind == "direct":
        from keel.firehose.buffers.direct import DirectBuffer

        return DirectBuffer(plat.database, settings)
    if kind == "spool":
        from keel.firehose.buffers.spool import SpoolBuffer

        return SpoolBuffer(plat.database, settings)
    if kind == "redis":
        from keel.firehose.buffers.redis import RedisBuffer

        return RedisBuffer(plat.database, settings)
    raise NotImplementedError(f"KEEL_FIREHOSE_BUFFER={kind} is not built yet")


@asynccontextmanager
async def firehose_workers(plat: Platform) -> AsyncIterator[None]:
    """The buffer and its writers; stopping flushes what it can, the rest waits for next start."""
    settings = plat.settings
    assert isinstance(settings, FirehoseSettings)
    buffer = make_buffer(plat, settings)
    buffer.max_waiting = settings.ingest_queue_max_events
    await buffer.start()
    plat.services["buffer"] = buffer
    plat.add_readiness_check(buffer.unready)
    # Ingest goes on into a spool or Redis while the store is down (not into the store itself).
    plat.buffers_database_outages = buffer.kind != "direct"
    with contextlib.suppress(Exception):  # unreachable now: /ready says so until it is seen
        plat.migrations_verified = not await pending_migrations(plat.database, [MIGRATIONS])
    try:
        yield
    finally:
        await buffer.stop()


async def firehose_health(plat: Platform) -> dict[str, Any]:
    buffer: Buffer = plat.services["buffer"]
    body = (await buffer.health()).as_dict()
    try:
        async with plat.database.read() as conn:
            body["dead_letters"] = await service.count_dead_letters(conn)
    except Exception as exc:  # the store may be down: the buffer's figures still stand
        body["dead_letters"] = None
        body["store"].setdefault("error", type(exc).__name__)
        body["store"]["status"] = "down"
    return body


SPEC = ServiceSpec(
    name="firehose",
    title="firehose",
    description="Event ingestion: a 202 means the event is durable, and it is never lost.",
    routers=[router],
    migrations=MIGRATIONS,
    fast_routes=[
        FastRoute("POST", "/events", log_every=100),
        FastRoute("POST", "/events/batch", log_every=10),
    ],
    workers=firehose_workers,
    health=firehose_health,
)


def create_app(settings: FirehoseSettings | None = None) -> FastAPI:
    return create_service_app(SPEC, settings or FirehoseSettings())
