"""The outbox webhook worker, against a real HTTP receiver: signed, retried, leased, restartable."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from prometheus_client import REGISTRY
from sqlalchemy import delete, insert, select, update
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from keel.core.auth import Scope
from keel.core.database import Database
from keel.ledger import outbox_store
from keel.ledger.outbox import OutboxWorker
from keel.ledger.outbox_store import (
    Outcome,
    claim_due_deliveries,
    dispatch_events,
    purge_settled,
    record_outcomes,
    retry_delay,
)
from keel.ledger.registration import MIGRATIONS
from keel.ledger.settings import LedgerSettings
from keel.ledger.signatures import sign, verify_signature
from keel.ledger.tables import deliveries, outbox
from tests import backends
from tests.ledger.helpers import deposit, new_user

SECRET = "test-webhook-secret"
DEADLINE = 20.0  # seconds any awaited condition may take before the test fails
T = TypeVar("T")


# --- a database of this module's own ------------------------------------------------------------


@pytest.fixture(scope="module")
def private_postgres_url(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL database only these tests use.

    Ledger servers other tests leave running on the session's shared database run outbox workers
    too, with other webhook settings: they would dispatch and deliver this module's events.
    """
    yield from backends.migrated_postgres_database([MIGRATIONS])


@pytest.fixture
def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """As the suite's ``database_url``, but on PostgreSQL this module's own database."""
    if backend == "postgres":
        url: str = request.getfixturevalue("private_postgres_url")
        return url
    return backends.migrated_sqlite_url(tmp_path, [MIGRATIONS])


# --- a real receiver ---------------------------------------------------------------------------


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
    """A webhook endpoint under uvicorn that records every request and misbehaves on demand."""

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

    def for_transaction(self, transaction_id: int) -> list[Received]:
        return [r for r in self.requests if r.event["data"]["id"] == transaction_id]

    def for_event(self, event_id: int) -> list[Received]:
        return [r for r in self.requests if r.event["id"] == event_id]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(DEADLINE), self._changed:
            await self._changed.wait_for(predicate)


@pytest.fixture
async def receiver(database: Database) -> AsyncIterator[Receiver]:
    rx = Receiver()
    config = uvicorn.Config(
        rx.app(),
        host="127.0.0.1",
        port=0,  # the OS picks a free port: no race with other tests or processes
        lifespan="off",
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    await eventually(lambda: _started(server, serving))
    port = server.servers[0].sockets[0].getsockname()[1]
    rx.url = f"http://127.0.0.1:{port}/hooks/{uuid.uuid4().hex}"
    yield rx
    rx.release.set()
    server.should_exit = True
    await asyncio.wait_for(serving, DEADLINE)
    async with database.write() as conn:  # each test owns its rows, also in a shared PostgreSQL
        await conn.execute(delete(deliveries).where(deliveries.c.url == rx.url))


async def _started(server: uvicorn.Server, serving: asyncio.Task[None]) -> bool:
    if serving.done():
        serving.result()  # surface why it could not start
    return bool(server.started)


def settings_for(database_url: str, url: str, **overrides: Any) -> LedgerSettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "rate_limit": "100000/second",
        "access_log": False,
        "webhook_urls": [url],
        "webhook_secret": SECRET,
        "webhook_timeout_seconds": 30.0,
        "webhook_max_attempts": 4,
        "webhook_backoff_base_seconds": 0.05,
        "webhook_backoff_max_seconds": 0.4,
        "outbox_poll_seconds": 0.01,
    }
    return LedgerSettings(**(values | overrides))


@pytest.fixture
def ledger_settings(database_url: str, receiver: Receiver) -> LedgerSettings:
    """The ledger app of these tests sends its webhooks to this test's receiver."""
    return settings_for(database_url, receiver.url)


# --- waiting on conditions ---------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[T | None]]) -> T:
    """Poll ``check`` until it returns something truthy, failing after DEADLINE seconds."""
    async with asyncio.timeout(DEADLINE):
        while True:
            value = await check()
            if value:
                return value
            await asyncio.sleep(0.01)  # a poll interval, not a guess at how long the work takes


async def delivery_row(database: Database, delivery_id: int) -> Any:
    async with database.read() as conn:
        return (await conn.execute(select(deliveries).where(deliveries.c.id == delivery_id))).one()


async def in_state(database: Database, delivery_id: int, state: str) -> Any:
    row = await delivery_row(database, delivery_id)
    return row if row.state == state else None


async def insert_event(database: Database, transaction_id: int) -> int:
    """An outbox event as a posting writes it, for tests that drive the worker without the app."""
    payload = {"type": "transaction.posted", "data": {"id": transaction_id, "amount": 7}}
    async with database.write() as conn:
        return int(
            (
                await conn.execute(
                    insert(outbox)
                    .values(
                        event_type="transaction.posted",
                        payload=json.dumps(payload),
                        created_at=datetime.now(UTC),
                    )
                    .returning(outbox.c.id)
                )
            ).scalar_one()
        )


def counter(outcome: str) -> float:
    value = REGISTRY.get_sample_value("keel_ledger_webhook_deliveries_total", {"outcome": outcome})
    return value or 0.0


# --- the tests ---------------------------------------------------------------------------------


async def test_delivery_arrives_signed_with_the_event(
    client: httpx.AsyncClient, receiver: Receiver, database: Database
) -> None:
    user = await new_user(client)
    posted = await deposit(client, user["id"], 1_234)
    await receiver.wait_for(lambda: bool(receiver.for_transaction(posted["id"])))
    [got] = receiver.for_transaction(posted["id"])
    assert verify_signature(SECRET, got.headers["keel-signature"], got.body)
    assert not verify_signature("another-secret", got.headers["keel-signature"], got.body)
    assert got.event["type"] == "transaction.posted"
    assert got.event["data"] == posted
    assert got.headers["content-type"] == "application/json"
    assert got.headers["keel-event-id"] == str(got.event["id"])
    assert got.attempt == 1
    row = await eventually(lambda: in_state(database, got.delivery_id, "delivered"))
    assert row.attempts == 1 and row.last_status == 204 and row.lease_until is None
    listing = await client.get("/webhooks/deliveries", params={"event_id": got.event["id"]})
    assert listing.status_code == 200
    [item] = listing.json()["items"]
    assert item["state"] == "delivered" and item["url"] == receiver.url
    assert item["delivered_at"] is not None and item["last_error"] is None


async def test_failing_receiver_is_retried_with_backoff_until_it_succeeds(
    client: httpx.AsyncClient,
    receiver: Receiver,
    database: Database,
    ledger_settings: LedgerSettings,
) -> None:
    receiver.fail_first = 3
    retrying_before = counter("retrying")
    user = await new_user(client)
    posted = await deposit(client, user["id"], 5)
    await receiver.wait_for(lambda: len(receiver.for_transaction(posted["id"])) == 4)
    got = receiver.for_transaction(posted["id"])
    assert [r.attempt for r in got] == [1, 2, 3, 4]
    assert len({r.delivery_id for r in got}) == 1 and len({r.body for r in got}) == 1
    assert all(verify_signature(SECRET, r.headers["keel-signature"], r.body) for r in got)
    base = ledger_settings.webhook_backoff_base_seconds
    cap = ledger_settings.webhook_backoff_max_seconds
    for attempt, (before, after) in enumerate(pairwise(got), start=1):
        # Lower bounds only: the wait after a failure is never shorter than half its step.
        assert after.at - before.at >= retry_delay(attempt, base, cap, rand=lambda: 0.0)
    row = await eventually(lambda: in_state(database, got[0].delivery_id, "delivered"))
    assert row.attempts == 4 and row.last_status == 204
    assert counter("retrying") >= retrying_before + 3


async def test_gives_up_after_max_attempts_and_lists_it_as_failed(
    client: httpx.AsyncClient, receiver: Receiver, database: Database
) -> None:
    receiver.status = 503
    failed_before = counter("failed")
    user = await new_user(client)
    posted = await deposit(client, user["id"], 9)
    await receiver.wait_for(lambda: bool(receiver.for_transaction(posted["id"])))
    event_id = receiver.for_transaction(posted["id"])[0].event["id"]

    async def failed_items() -> list[dict[str, Any]]:
        params = {"state": "failed", "event_id": event_id}
        items: list[dict[str, Any]] = (
            await client.get("/webhooks/deliveries", params=params)
        ).json()["items"]
        return items

    [item] = await eventually(failed_items)
    assert item["attempts"] == 4 and item["last_status"] == 503
    assert item["last_error"] == "HTTP 503" and item["delivered_at"] is None
    assert len(receiver.for_event(event_id)) == 4
    pending = await client.get("/webhooks/deliveries", params={"state": "pending"})
    assert event_id not in [i["event_id"] for i in pending.json()["items"]]
    assert counter("failed") >= failed_before + 1


async def test_a_claimed_delivery_is_not_claimed_again_until_its_lease_expires(
    database: Database,
) -> None:
    url = f"http://127.0.0.1:9/hooks/{uuid.uuid4().hex}"
    event_ids = {await insert_event(database, 10_000 + i) for i in range(12)}
    now = datetime.now(UTC)
    async with database.write() as conn:
        await dispatch_events(conn, [url], 10_000, now)

    async def claim(at: datetime) -> list[int]:
        async with database.write() as conn:
            claimed = await claim_due_deliveries(
                conn, now=at, lease_seconds=60, limit=5, max_attempts=4
            )
        return [c.id for c in claimed if c.event_id in event_ids]

    try:
        # Four workers at once: every delivery goes to exactly one of them.
        rounds = await asyncio.gather(*(claim(now) for _ in range(4)))
        claimed = [delivery_id for batch in rounds for delivery_id in batch]
        while len(claimed) < len(event_ids):
            more = await claim(now)
            assert more, "due deliveries were left unclaimed"
            claimed += more
        assert len(claimed) == len(set(claimed)) == len(event_ids)
        assert await claim(now) == []  # all leased
        after_lease = now + timedelta(seconds=61)
        reclaimed = [d for _ in range(3) for d in await claim(after_lease)]
        assert sorted(reclaimed) == sorted(claimed)
        row = await delivery_row(database, claimed[0])
        assert row.attempts == 2
    finally:
        async with database.write() as conn:
            await conn.execute(delete(deliveries).where(deliveries.c.url == url))


async def test_a_crashed_workers_delivery_is_sent_by_the_next_worker(
    database: Database, database_url: str, receiver: Receiver
) -> None:
    settings = settings_for(database_url, receiver.url)
    event_id = await insert_event(database, 20_001)
    async with database.write() as conn:  # a worker claims the delivery, then dies
        await dispatch_events(conn, [receiver.url], 10_000, datetime.now(UTC))
        claimed = await claim_due_deliveries(
            conn, now=datetime.now(UTC), lease_seconds=60, limit=100, max_attempts=4
        )
    [mine] = [c for c in claimed if c.event_id == event_id]
    async with database.write() as conn:  # ... and its lease runs out
        await conn.execute(
            update(deliveries)
            .where(deliveries.c.id == mine.id)
            .values(lease_until=datetime.now(UTC) - timedelta(seconds=1))
        )
    worker = OutboxWorker(database, settings)
    worker.start()
    try:
        row = await eventually(lambda: in_state(database, mine.id, "delivered"))
    finally:
        await worker.stop()
    assert row.attempts == 2
    assert [r.attempt for r in receiver.for_event(event_id)] == [2]


async def test_stopping_a_worker_mid_request_hands_the_delivery_to_the_next(
    database: Database, database_url: str, receiver: Receiver
) -> None:
    settings = settings_for(database_url, receiver.url)
    receiver.hang = True
    event_id = await insert_event(database, 30_001)
    first = OutboxWorker(database, settings)
    first.start()
    await receiver.wait_for(lambda: bool(receiver.for_event(event_id)))
    # The receiver holds the request for up to the 30 s timeout; shutdown must not wait for it.
    await asyncio.wait_for(first.stop(), 5)
    delivery_id = receiver.for_event(event_id)[0].delivery_id
    row = await delivery_row(database, delivery_id)
    assert (row.state, row.attempts, row.lease_until) == ("pending", 1, None)
    assert row.last_error.startswith("interrupted")

    receiver.hang = False
    second = OutboxWorker(database, settings)
    second.start()
    try:
        row = await eventually(lambda: in_state(database, delivery_id, "delivered"))
    finally:
        await second.stop()
    assert [r.attempt for r in receiver.for_event(event_id)] == [1, 2]


async def test_posting_returns_while_the_receiver_hangs(
    client: httpx.AsyncClient, receiver: Receiver, database: Database
) -> None:
    receiver.hang = True
    user = await new_user(client)
    first = await deposit(client, user["id"], 1)
    await receiver.wait_for(lambda: bool(receiver.for_transaction(first["id"])))
    # The worker is now stuck in a request that will not end on its own for 30 s.
    second = await asyncio.wait_for(
        client.post("/transactions", json={"user_id": user["id"], "amount": 2}), 5
    )
    assert second.status_code == 201
    await receiver.wait_for(lambda: bool(receiver.for_transaction(second.json()["id"])))
    health = (await client.get("/health")).json()["outbox"]
    assert health["pending_deliveries"] >= 2 and health["worker"] == "running"
    receiver.release.set()
    for posted in (first, second.json()):
        delivery_id = receiver.for_transaction(posted["id"])[0].delivery_id
        await eventually(lambda d=delivery_id: in_state(database, d, "delivered"))


async def test_events_dispatched_without_urls_get_no_deliveries(database: Database) -> None:
    event_id = await insert_event(database, 40_001)
    async with database.write() as conn:
        assert await dispatch_events(conn, [], 10_000, datetime.now(UTC)) >= 1
    async with database.read() as conn:
        dispatched_at = (
            await conn.execute(select(outbox.c.dispatched_at).where(outbox.c.id == event_id))
        ).scalar_one()
        rows = (
            await conn.execute(select(deliveries.c.id).where(deliveries.c.event_id == event_id))
        ).all()
    assert dispatched_at is not None and rows == []


async def test_each_event_gets_one_delivery_per_url(database: Database) -> None:
    urls = [f"http://127.0.0.1:9/hooks/{uuid.uuid4().hex}" for _ in range(2)]
    event_id = await insert_event(database, 45_001)
    try:
        async with database.write() as conn:
            await dispatch_events(conn, urls, 10_000, datetime.now(UTC))
        async with database.read() as conn:
            rows = (
                await conn.execute(
                    select(deliveries.c.url, deliveries.c.state, deliveries.c.attempts).where(
                        deliveries.c.event_id == event_id
                    )
                )
            ).all()
        assert sorted(rows) == sorted((url, "pending", 0) for url in urls)
    finally:
        async with database.write() as conn:
            await conn.execute(delete(deliveries).where(deliveries.c.url.in_(urls)))


async def test_a_stale_worker_cannot_overwrite_the_new_lease_holder(
    database: Database, receiver: Receiver, ledger_settings: LedgerSettings
) -> None:
    event_id = await insert_event(database, 50_001)
    now = datetime.now(UTC)
    async with database.write() as conn:
        await dispatch_events(conn, [receiver.url], 10_000, now)
        [stale] = [
            c
            for c in await claim_due_deliveries(
                conn, now=now, lease_seconds=60, limit=100, max_attempts=4
            )
            if c.event_id == event_id
        ]
        later = now + timedelta(seconds=61)
        [current] = [
            c
            for c in await claim_due_deliveries(
                conn, now=later, lease_seconds=60, limit=100, max_attempts=4
            )
            if c.event_id == event_id
        ]
        labels = await record_outcomes(
            conn, [Outcome(stale, 500, "HTTP 500")], now=later, settings=ledger_settings
        )
    assert labels == ["stale"] and current.attempt == 2
    row = await delivery_row(database, stale.id)
    assert row.lease_until is not None and row.last_status is None  # the new holder's lease


async def test_worker_keeps_going_while_the_database_is_down() -> None:
    settings = settings_for("postgresql://postgres@127.0.0.1:1/nowhere", "http://127.0.0.1:9/")
    down = Database.from_settings(settings)  # nothing listens on port 1
    worker = OutboxWorker(down, settings)
    worker.start()
    try:

        async def failed_twice() -> bool:
            return worker.consecutive_errors >= 2

        await eventually(failed_twice)
        assert worker.state == "running" and worker.last_error
    finally:
        await asyncio.wait_for(worker.stop(), 5)
        await down.dispose()
    assert worker.state == "stopped"


async def test_health_reports_the_outbox(client: httpx.AsyncClient) -> None:
    body = (await client.get("/health")).json()
    outbox_health = body["outbox"]
    assert set(outbox_health) >= {
        "undispatched_events",
        "pending_deliveries",
        "failed_deliveries",
        "oldest_pending_age_seconds",
        "worker",
    }
    assert outbox_health["oldest_pending_age_seconds"] >= 0


async def test_deliveries_listing_pages_newest_first(
    client: httpx.AsyncClient, receiver: Receiver, database: Database
) -> None:
    user = await new_user(client)
    posted = [await deposit(client, user["id"], amount) for amount in (1, 2, 3)]
    for p in posted:
        await receiver.wait_for(lambda p=p: bool(receiver.for_transaction(p["id"])))
    mine = sorted(receiver.for_transaction(p["id"])[0].delivery_id for p in posted)
    seen: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/webhooks/deliveries", params=params)).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None or all(d in seen for d in mine):
            break
    assert seen == sorted(seen, reverse=True)
    assert [d for d in seen if d in mine] == mine[::-1]


async def test_deliveries_listing_checks_its_input_and_scope(
    client: httpx.AsyncClient, make_key: Any
) -> None:
    bad_state = await client.get("/webhooks/deliveries", params={"state": "lost"})
    bad_cursor = await client.get("/webhooks/deliveries", params={"cursor": "nope"})
    writer = await make_key(Scope.WRITE)
    forbidden = await client.get(
        "/webhooks/deliveries", headers={"Authorization": f"Bearer {writer}"}
    )
    assert bad_state.status_code == 422
    assert bad_cursor.status_code == 400 and bad_cursor.json()["code"] == "invalid_cursor"
    assert forbidden.status_code == 403


def test_signature_verification() -> None:
    body = b'{"id":1}'
    now = 1_700_000_000
    header = sign(SECRET, body, timestamp=now)
    assert verify_signature(SECRET, header, body, now=now + 10)
    assert verify_signature(SECRET, f"v1={'0' * 64},{header}", body, now=now)  # rotation
    assert not verify_signature(SECRET, header, body + b" ", now=now)
    assert not verify_signature("wrong", header, body, now=now)
    assert not verify_signature(SECRET, header, body, now=now + 301)  # a replay, too late
    assert not verify_signature(SECRET, header, body, tolerance=5, now=now - 6)
    for malformed in ("", "t=abc,v1=00", f"t={now}", header.split(",")[1], "t=١٢,v1=é"):
        assert not verify_signature(SECRET, malformed, body, now=now)


def test_retry_delay_grows_exponentially_with_jitter_and_a_cap() -> None:
    low = [retry_delay(n, 1.0, 60.0, rand=lambda: 0.0) for n in range(1, 9)]
    high = [retry_delay(n, 1.0, 60.0, rand=lambda: 1.0) for n in range(1, 9)]
    assert low == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert high == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert retry_delay(10_000, 1.0, 60.0) <= 60.0  # no overflow for absurd attempt counts


@pytest.mark.parametrize("lease", [1.0, 5.0])
def test_a_lease_shorter_than_the_request_timeout_is_refused(lease: float) -> None:
    with pytest.raises(ValueError, match="webhook_lease_seconds"):
        LedgerSettings(webhook_timeout_seconds=5.0, webhook_lease_seconds=lease)


async def test_retention_purge_keeps_failed_and_owed_deliveries(database: Database) -> None:
    """Old delivered history goes; failed and pending deliveries, and their events, stay."""
    old = datetime.now(UTC) - timedelta(days=30)
    async with database.write() as conn:
        ids = []
        for _ in range(3):
            event_id = (
                await conn.execute(
                    insert(outbox)
                    .values(
                        event_type="transaction.posted",
                        payload="{}",
                        created_at=old,
                        dispatched_at=old,
                    )
                    .returning(outbox.c.id)
                )
            ).scalar_one()
            ids.append(event_id)
        for event_id, state in zip(ids, ["delivered", "failed", "pending"], strict=True):
            await conn.execute(
                insert(deliveries).values(
                    event_id=event_id,
                    url="http://127.0.0.1:9/",
                    state=state,
                    attempts=1,
                    next_attempt_at=old,
                    created_at=old,
                    delivered_at=old if state == "delivered" else None,
                )
            )
    async with database.write() as conn:
        await purge_settled(conn, datetime.now(UTC) - timedelta(days=7))
    async with database.read() as conn:
        left_events = set(
            (await conn.execute(select(outbox.c.id).where(outbox.c.id.in_(ids)))).scalars()
        )
        left_states = set(
            (
                await conn.execute(select(deliveries.c.state).where(deliveries.c.event_id.in_(ids)))
            ).scalars()
        )
    assert left_events == {ids[1], ids[2]}
    assert left_states == {"failed", "pending"}


async def test_health_counts_stop_at_their_cap(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog past the cap is reported as the cap, so /health stays cheap under any backlog."""
    monkeypatch.setattr(outbox_store, "HEALTH_COUNT_CAP", 3)
    created = datetime.now(UTC) - timedelta(seconds=30)
    async with database.write() as conn:
        ids = (
            await conn.execute(
                insert(outbox).returning(outbox.c.id),
                [{"event_type": "test", "payload": "{}", "created_at": created} for _ in range(5)],
            )
        ).scalars()
        made = list(ids)
    try:
        async with database.read() as conn:
            summary = await outbox_store.outbox_summary(conn, datetime.now(UTC))
    finally:  # no other test's worker may dispatch these
        async with database.write() as conn:
            await conn.execute(delete(outbox).where(outbox.c.id.in_(made)))
    assert summary["undispatched_events"] == 3
    assert summary["counts_capped_at"] == 3
    assert summary["oldest_pending_age_seconds"] >= 30
