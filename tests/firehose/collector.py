"""A fake firehose collector: the ``POST /events/batch`` contract and nothing more, misbehaving
on demand, so the client's tests need no database, no Redis and no real service.

It is a real ASGI app. The sync client talks to it over TCP (uvicorn in a thread, on a port the OS
picks); the async client may reach it in memory through ``httpx.ASGITransport``. It decodes gzip
and NDJSON, enforces the 1,000-event and 1 MiB limits, stores events by ``event_id`` (once each,
as the real service does) and records every attempt with its arrival time.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import uuid
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.live_server import wait_until

API_KEY = "test-firehose-key"
MIB = 1024 * 1024
DEADLINE = 10.0


@dataclass
class Attempt:
    """One request the collector received."""

    at: float  # time.monotonic() on arrival
    headers: dict[str, str]
    body: bytes  # as sent (gzipped if the client gzipped)
    events: list[dict[str, Any]]
    status: int = 0

    @property
    def ids(self) -> list[str]:
        return [e.get("event_id", "") for e in self.events]


@dataclass
class Answer:
    """A planned reply to the next request instead of the normal one."""

    status: int
    code: str
    retry_after: str | None = None
    store_first: bool = False  # 502 outcome_unknown: the events *were* stored


@dataclass
class Collector:
    url: str = "http://collector"
    attempts: list[Attempt] = field(default_factory=list)
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    deliveries: Counter[str] = field(default_factory=Counter)  # event_id -> times received
    script: deque[Answer] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        """Forget everything, for the next test on the same server."""
        with self.lock:
            self.attempts.clear()
            self.stored.clear()
            self.deliveries.clear()
            self.script.clear()

    def plan(self, *answers: Answer) -> None:
        """Answer the next requests with these, in order; then accept normally."""
        self.script.extend(answers)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/events/batch", self._batch, methods=["POST"])])

    async def _batch(self, request: Request) -> Response:
        body = await request.body()
        try:
            events = decode(body, request.headers)
        except ValueError as error:
            return problem(413 if "limit" in str(error) else 400, "invalid_body", str(error))
        attempt = Attempt(time.monotonic(), dict(request.headers), body, events)
        with self.lock:
            self.attempts.append(attempt)
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            attempt.status = 401
            return problem(401, "unauthorized", "missing or unknown API key")
        with self.lock:
            planned = self.script.popleft() if self.script else None
        response = self._store(events) if planned is None or planned.store_first else None
        if planned is not None:
            headers = {"Retry-After": planned.retry_after} if planned.retry_after else {}
            response = problem(planned.status, planned.code, "planned by the test", headers)
        assert response is not None
        attempt.status = response.status_code
        return response

    def _store(self, events: list[dict[str, Any]]) -> Response:
        rejected = []
        for index, event in enumerate(events):
            reason = invalid(event)
            if reason:
                rejected.append({"index": index, "code": reason[0], "detail": reason[1]})
                continue
            with self.lock:
                self.stored.setdefault(event["event_id"], event)
                self.deliveries[event["event_id"]] += 1
        if len(rejected) == len(events):
            return problem(422, "invalid_events", "no event in the batch is valid")
        return JSONResponse({"accepted": len(events) - len(rejected), "rejected": rejected}, 202)


def decode(body: bytes, headers: Any) -> list[dict[str, Any]]:
    """The batch's events, enforcing the contract's limits on both sizes."""
    if len(body) > MIB:
        raise ValueError("over the 1 MiB limit")
    if headers.get("content-encoding") == "gzip":
        inflater = zlib.decompressobj(wbits=31)
        body = inflater.decompress(body, MIB + 1)
        if len(body) > MIB:
            raise ValueError("over the 1 MiB limit decompressed")
    if headers.get("content-type", "").startswith("application/x-ndjson"):
        events = [json.loads(line) for line in body.splitlines() if line.strip()]
    else:
        events = json.loads(body)
    if not isinstance(events, list):
        raise ValueError("a batch is a JSON array")
    if len(events) > 1000:
        raise ValueError("over the 1,000-event limit")
    return events


def invalid(event: Any) -> tuple[str, str] | None:
    """Why the real service would reject this event, or None."""
    if not isinstance(event, dict) or not event.get("user_id"):
        return "invalid_event", "user_id is required"
    try:
        uuid.UUID(str(event.get("event_id")))
    except ValueError:
        return "invalid_event", "event_id is not a UUID"
    timestamp = event.get("timestamp")
    if isinstance(timestamp, str):
        try:
            datetime.fromisoformat(timestamp)
        except ValueError:
            return "invalid_timestamp", "timestamp is not RFC 3339"
    elif not isinstance(timestamp, int | float):
        return "invalid_timestamp", "timestamp is required"
    return None


def problem(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    body = {"type": "about:blank", "title": code, "status": status, "detail": detail, "code": code}
    return JSONResponse(body, status, headers=headers, media_type="application/problem+json")


def gunzip(body: bytes) -> list[dict[str, Any]]:
    value: list[dict[str, Any]] = json.loads(gzip.decompress(body))
    return value


@contextmanager
def serving(collector: Collector) -> Iterator[Collector]:
    """Serve ``collector`` over TCP on a free port, in a thread, for the sync client."""
    config = uvicorn.Config(
        collector.app(), host="127.0.0.1", port=0, lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fake-collector", daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), DEADLINE, "the fake collector")
    assert server.started, "the fake collector did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    collector.url = f"http://127.0.0.1:{port}"
    try:
        yield collector
    finally:
        server.should_exit = True
        thread.join(DEADLINE)
