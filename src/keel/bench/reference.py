"""Reference apps for the benchmark tables: what uvicorn alone serves, and what keel adds.

``bare_app`` answers every request 200 ``{}`` with nothing in between: the server's ceiling on
this machine. ``noop_app`` is a keel service with one authenticated fast route that does nothing:
its rate against the bare one's, measured in the same run, is the core's per-request cost. Both
are uvicorn factories (``uvicorn --factory keel.bench.reference:noop_app``).
"""

from __future__ import annotations

from typing import ClassVar

from alembic import command
from fastapi import APIRouter
from sqlalchemy.engine import Connection
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from keel.core.app import ServiceSpec, create_service_app
from keel.core.auth import Scope as KeyScope
from keel.core.auth import create_api_key
from keel.core.chains import CORE_CHAIN
from keel.core.database import Database, create_engine
from keel.core.fastpath import FastRoute
from keel.core.migrate import alembic_config
from keel.core.platform import WriteKey
from keel.core.settings import ServiceSettings


class ReferenceSettings(ServiceSettings):
    """``KEEL_REFERENCE_*`` or the shared ``KEEL_*`` variables."""

    model_config = ServiceSettings.model_config | {"env_prefix": "KEEL_REFERENCE_"}
    service_name: ClassVar[str] = "reference"


async def _bare(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"{}"})


def bare_app() -> ASGIApp:
    """A bare ASGI handler: 200 ``{}`` for every request."""
    return _bare


_ACCEPTED = b'{"status":"accepted"}'
router = APIRouter()


@router.post("/noop", status_code=202, summary="Authenticate (write scope), then do nothing")
async def noop(_key: WriteKey) -> Response:
    return Response(_ACCEPTED, status_code=202, media_type="application/json")


SPEC = ServiceSpec(
    name="reference",
    title="reference",
    description="One authenticated no-op route: the core's per-request cost.",
    routers=[router],
    fast_routes=[FastRoute("POST", "/noop")],
)


def noop_app(settings: ReferenceSettings | None = None) -> ASGIApp:
    """A keel service app whose only route, ``POST /noop`` (write scope), answers 202."""
    return create_service_app(SPEC, settings or ReferenceSettings())


async def prepare_reference_database(database_url: str) -> str:
    """Create the core tables at ``database_url`` and return a new write key for ``noop_app``."""
    database = Database(create_engine(database_url))

    def upgrade(connection: Connection) -> None:
        command.upgrade(alembic_config(CORE_CHAIN, connection), "head")

    try:
        async with database.write() as conn:
            await conn.run_sync(upgrade)
            return await create_api_key(conn, scope=KeyScope.WRITE, name="reference")
    finally:
        await database.dispose()
