"""A real webhook receiver under uvicorn, and waiting on conditions, for the outbox tests."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvicorn
from prometheus_client import REGISTRY
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keel.core.database import Database
from keel.core.outbox.tables import deliveries

SECRET = "test-webhook-secret"
DEADLINE = 20.0  # seconds any awaited condition may take before the test fails
T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T | None]]) -> T:
    """Poll ``check`` until it returns something truthy, failing after DEADLINE seconds."""
    async with asyncio.timeout(DEADLINE):
        while True:
            value = await check()
            if value:
                return value
            await asyncio.sleep(0.01)  # a poll interval, not a guess at how long the work takes


def counter(service: str, outcome: str) -> float:
    labels = {"service": service, "outcome": outcome}
    value = REGISTRY.get_sample_value("keel_webhook_deliveries_total", labels)
    return value or 0.0


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() on arrival

    @property
    def event(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value

    @property
    def attempt(self) -> int:
        return int(self.headers["keel-delivery-attempt"])

    @property
    def delivery_id(self) -> int:
        return int(self.headers["keel-delivery-id"])


@dataclass
class Receiver:
    """A webhook endpoint that records every request and misbehaves on demand."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    fail_first: int = 0  # answer 500 to the first N requests for each event
    status: int = 204  # what it answers otherwise
    hang: bool = False  # hold requests open until `release` is set
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            got = Received(dict(request.headers), await request.body(), time.monotonic())
            async with self._changed:
                self.requests.append(got)
                self._changed.notify_all()
            if self.hang:
                await self.release.wait()
            seen = sum(1 for r in self.requests if r.event["id"] == got.event["id"])
            return Response(status_code=500 if seen <= self.fail_first else self.status)

        return Starlette(routes=[Route("/hooks/{name}", hook, methods=["POST"])])

    def for_data(self, data_id: int) -> list[Received]:
        """Requests whose event's ``data`` has this ``id``."""
        return [r for r in self.requests if r.event["data"]["id"] == data_id]

    def for_event(self, event_id: str) -> list[Received]:
        return [r for r in self.requests if r.event["id"] == event_id]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE), self._changed:
            await self._changed.wait_for(predicate)


@asynccontextmanager
async def running_receiver() -> AsyncIterator[Receiver]:
    """A receiver on a free port (the OS picks it: no race with other tests or processes)."""
    rx = Receiver()
    config = uvicorn.Config(
        rx.app(),
        host="127.0.0.1",
        port=0,
        lifespan="off",
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())

    async def started() -> bool:
        if serving.done():
            serving.result()  # surface why it could not start
        return bool(server.started)

    await eventually(started)
    port = server.servers[0].sockets[0].getsockname()[1]
    rx.url = f"http://127.0.0.1:{port}/hooks/{uuid.uuid4().hex}"
    try:
        yield rx
    finally:
        rx.release.set()
        server.should_exit = True
        await asyncio.wait_for(serving, DEADLINE)


async def delivery_row(database: Database, delivery_id: int) -> Any:
    """One webhook delivery's row, read from the database."""
    async with database.read() as conn:
        return (await conn.execute(select(deliveries).where(deliveries.c.id == delivery_id))).one()


async def in_state(database: Database, delivery_id: int, state: str) -> Any:
    """The delivery's row if it is in ``state`` (for ``eventually``), else None."""
    row = await delivery_row(database, delivery_id)
    return row if row.state == state else None
