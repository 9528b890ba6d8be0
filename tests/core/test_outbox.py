"""The core outbox, used by a made-up service: published, signed, retried, leased, purged.

Each test publishes as a service of its own name, so its rows are its own even in the shared
PostgreSQL database, where other tests' ledger servers run outbox workers of their own.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import httpx
import pytest
from fastapi import APIRouter, Request
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict
from sqlalchemy import delete, func, insert, select, update

from keel.core.app import ServiceSpec, create_service_app
from keel.core.database import Database
from keel.core.maintenance import run_if_due
from keel.core.outbox import Outbox, WebhookSettings, store
from keel.core.outbox import service as outbox_service
from keel.core.outbox.service import purge_job
from keel.core.outbox.signatures import sign, verify_signature
from keel.core.outbox.store import (
    Outcome,
    claim_due_deliveries,
    dispatch_events,
    record_outcomes,
    retry_delay,
)
from keel.core.outbox.tables import deliveries, events
from keel.core.outbox.worker import OutboxWorker
from keel.core.platform import PlatformDep, WriteKey
from tests.support.webhooks import (
    SECRET,
    Receiver,
    delivery_row,
    eventually,
    in_state,
    running_receiver,
)

EVENT = "order.placed"


class ShopSettings(WebhookSettings):
    model_config = SettingsConfigDict(env_prefix="KEEL_SHOP_", extra="ignore")
    service_name: ClassVar[str] = "shop"


@pytest.fixture
def service() -> str:
    return f"shop-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def outbox(service: str) -> Outbox:
    return Outbox(service, [EVENT])


@pytest.fixture
async def receiver(database: Database) -> AsyncIterator[Receiver]:
    async with running_receiver() as rx:
        yield rx
    async with database.write() as conn:  # each test owns its rows, also in a shared PostgreSQL
        await conn.execute(delete(deliveries).where(deliveries.c.url == rx.url))


def settings_for(database_url: str, url: str | None, **overrides: Any) -> ShopSettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "rate_limit": "100000/second",
        "access_log": False,
        "webhook_urls": [url] if url else [],
        "webhook_secret": SECRET,
        "webhook_timeout_seconds": 30.0,
        "webhook_max_attempts": 4,
        "webhook_backoff_base_seconds": 0.05,
        "webhook_backoff_max_seconds": 0.4,
        "outbox_poll_seconds": 0.01,
    }
    return ShopSettings(**(values | overrides))


async def publish(database: Database, outbox: Outbox, n: int) -> uuid.UUID:
    async with database.write() as conn:
        return await outbox.publish_async(conn, EVENT, {"id": n, "sku": "x"})


async def internal_id(database: Database, event_id: uuid.UUID) -> int:
    async with database.read() as conn:
        query = select(events.c.id).where(events.c.event_id == event_id)
        return int((await conn.execute(query)).scalar_one())


# --- a service of its own on the core --------------------------------------------------------


def shop_app(service: str, outbox: Outbox, settings: ShopSettings) -> Any:
    router = APIRouter()

    @router.post("/orders", status_code=201)
    async def place_order(_key: WriteKey, plat: PlatformDep, request: Request) -> dict[str, Any]:
        order = await request.json()
        async with plat.database.write() as conn:
            event_id = await outbox.publish_async(conn, EVENT, order)
        return {"event_id": str(event_id)}

    spec = ServiceSpec(
        name=service, title=service, description="a test shop", routers=[router], outbox=outbox
    )
    return create_service_app(spec, settings)


@pytest.fixture
async def shop(
    service: str, outbox: Outbox, database_url: str, receiver: Receiver, admin_key: str
) -> AsyncIterator[httpx.AsyncClient]:
    app = shop_app(service, outbox, settings_for(database_url, receiver.url))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://shop.test",
            headers={"Authorization": f"Bearer {admin_key}"},
        ) as client,
    ):
        yield client


async def test_a_service_publishes_and_the_core_delivers_signed(
    shop: httpx.AsyncClient, receiver: Receiver, database: Database
) -> None:
    placed = await shop.post("/orders", json={"id": 7, "sku": "boot"})
    assert placed.status_code == 201
    event_id = placed.json()["event_id"]
    await receiver.wait_for(lambda: bool(receiver.for_event(event_id)))
    [got] = receiver.for_event(event_id)
    assert verify_signature(SECRET, got.headers["keel-signature"], got.body)
    assert got.event["type"] == EVENT and got.event["data"] == {"id": 7, "sku": "boot"}
    assert got.headers["keel-event-id"] == event_id == got.event["id"]
    assert uuid.UUID(event_id).version == 7
    await eventually(lambda: in_state(database, got.delivery_id, "delivered"))
    listing = await shop.get("/webhooks/deliveries", params={"event_id": event_id})
    assert listing.status_code == 200
    [item] = listing.json()["items"]
    assert item["id"] == got.delivery_id and item["event_id"] == event_id
    assert item["state"] == "delivered" and item["url"] == receiver.url
    bad = await shop.get("/webhooks/deliveries", params={"event_id": "17"})
    assert bad.status_code == 422


async def test_health_shows_only_the_class_of_the_workers_error(
    shop: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message can carry SQL, bound values or a URL's token; /health needs no key."""

    def leaky(*_args: Any) -> Any:
        raise RuntimeError("SELECT … WHERE url = 'https://hooks.test/?token=s3cr3t-t0ken'")

    monkeypatch.setattr("keel.core.outbox.worker.has_work", leaky)

    async def failing() -> dict[str, Any] | None:
        outbox = (await shop.get("/health")).json()["outbox"]
        return outbox if outbox["consecutive_errors"] >= 1 else None

    outbox = await eventually(failing)
    assert outbox["last_error"] == "RuntimeError"
    assert "s3cr3t" not in (await shop.get("/health")).text


async def test_worker_logs_never_carry_a_webhook_urls_credentials(
    database: Database,
    database_url: str,
    service: str,
    outbox: Outbox,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A URL's query or user-info often is its credential: the log names the endpoint only."""
    url = "http://hook-user:pa55w0rd@127.0.0.1:9/hooks?token=s3cr3t-t0ken"  # nothing listens
    settings = settings_for(database_url, url, webhook_max_attempts=1)
    event_id = await internal_id(database, await publish(database, outbox, 1))
    worker = OutboxWorker(database, settings, service)
    with caplog.at_level(logging.INFO, logger="keel"):
        worker.start()
        try:

            async def failed() -> Any:
                async with database.read() as conn:
                    query = select(deliveries.c.state).where(
                        deliveries.c.event_id == event_id, deliveries.c.state == "failed"
                    )
                    return (await conn.execute(query)).first()

            await eventually(failed)
        finally:
            await asyncio.wait_for(worker.stop(), 5)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "127.0.0.1:9/hooks" in text  # the delivery's failure is logged...
    assert "s3cr3t" not in text and "pa55w0rd" not in text  # ...without its credentials


# --- the worker and its SQL ------------------------------------------------------------------


async def test_a_claimed_delivery_is_not_claimed_again_until_its_lease_expires(
    database: Database, service: str, outbox: Outbox
) -> None:
    url = f"http://127.0.0.1:9/hooks/{uuid.uuid4().hex}"
    for i in range(12):
        await publish(database, outbox, i)
    now = datetime.now(UTC)
    async with database.write() as conn:
        assert await dispatch_events(conn, service, [url], 10_000, now) == 12

    async def claim(at: datetime) -> list[int]:
        async with database.write() as conn:
            claimed = await claim_due_deliveries(
                conn, service, now=at, lease_seconds=60, limit=5, max_attempts=4
            )
        return [c.id for c in claimed]

    # Four workers at once: every delivery goes to exactly one of them.
    rounds = await asyncio.gather(*(claim(now) for _ in range(4)))
    claimed = [delivery_id for batch in rounds for delivery_id in batch]
    while len(claimed) < 12:
        more = await claim(now)
        assert more, "due deliveries were left unclaimed"
        claimed += more
    assert len(claimed) == len(set(claimed)) == 12
    assert await claim(now) == []  # all leased
    after_lease = now + timedelta(seconds=61)
    reclaimed = [d for _ in range(3) for d in await claim(after_lease)]
    assert sorted(reclaimed) == sorted(claimed)
    assert (await delivery_row(database, claimed[0])).attempts == 2


async def test_a_worker_touches_only_its_own_services_rows(
    database: Database, service: str, outbox: Outbox
) -> None:
    await publish(database, outbox, 1)
    async with database.write() as conn:
        assert await dispatch_events(conn, f"{service}-other", ["http://x/"], 10_000, _now()) == 0
        assert await dispatch_events(conn, service, [], 10_000, _now()) == 1


def _now() -> datetime:
    return datetime.now(UTC)


async def test_a_crashed_workers_delivery_is_sent_by_the_next_worker(
    database: Database, database_url: str, receiver: Receiver, service: str, outbox: Outbox
) -> None:
    event_id = await publish(database, outbox, 20_001)
    async with database.write() as conn:  # a worker claims the delivery, then dies
        await dispatch_events(conn, service, [receiver.url], 10_000, _now())
        [mine] = await claim_due_deliveries(
            conn, service, now=_now(), lease_seconds=60, limit=100, max_attempts=4
        )
        await conn.execute(  # ... and its lease runs out
            update(deliveries)
            .where(deliveries.c.id == mine.id)
            .values(lease_until=_now() - timedelta(seconds=1))
        )
    worker = OutboxWorker(database, settings_for(database_url, receiver.url), service)
    worker.start()
    try:
        row = await eventually(lambda: in_state(database, mine.id, "delivered"))
    finally:
        await worker.stop()
    assert row.attempts == 2 and mine.event_id == event_id
    assert [r.attempt for r in receiver.for_event(str(event_id))] == [2]


async def test_stopping_a_worker_mid_request_hands_the_delivery_to_the_next(
    database: Database, database_url: str, receiver: Receiver, service: str, outbox: Outbox
) -> None:
    settings = settings_for(database_url, receiver.url)
    receiver.hang = True
    event_id = str(await publish(database, outbox, 30_001))
    first = OutboxWorker(database, settings, service)
    first.start()
    await receiver.wait_for(lambda: bool(receiver.for_event(event_id)))
    # The receiver holds the request for up to the 30 s timeout; shutdown must not wait for it.
    await asyncio.wait_for(first.stop(), 5)
    delivery_id = receiver.for_event(event_id)[0].delivery_id
    row = await delivery_row(database, delivery_id)
    assert (row.state, row.attempts, row.lease_until) == ("pending", 1, None)
    assert row.last_error.startswith("interrupted")

    receiver.hang = False
    second = OutboxWorker(database, settings, service)
    second.start()
    try:
        await eventually(lambda: in_state(database, delivery_id, "delivered"))
    finally:
        await second.stop()
    assert [r.attempt for r in receiver.for_event(event_id)] == [1, 2]


async def test_events_dispatched_without_urls_get_no_deliveries(
    database: Database, service: str, outbox: Outbox
) -> None:
    event_id = await publish(database, outbox, 40_001)
    async with database.write() as conn:
        assert await dispatch_events(conn, service, [], 10_000, _now()) == 1
    async with database.read() as conn:
        dispatched_at = (
            await conn.execute(select(events.c.dispatched_at).where(events.c.event_id == event_id))
        ).scalar_one()
        rows = (
            await conn.execute(select(deliveries.c.id).where(deliveries.c.service == service))
        ).all()
    assert dispatched_at is not None and rows == []


async def test_each_event_gets_one_delivery_per_url(
    database: Database, service: str, outbox: Outbox
) -> None:
    urls = [f"http://127.0.0.1:9/hooks/{uuid.uuid4().hex}" for _ in range(2)]
    await publish(database, outbox, 45_001)
    async with database.write() as conn:
        await dispatch_events(conn, service, urls, 10_000, _now())
    async with database.read() as conn:
        rows = (
            await conn.execute(
                select(deliveries.c.url, deliveries.c.state, deliveries.c.attempts).where(
                    deliveries.c.service == service
                )
            )
        ).all()
    assert sorted(rows) == sorted((url, "pending", 0) for url in urls)


async def test_a_stale_worker_cannot_overwrite_the_new_lease_holder(
    database: Database, database_url: str, service: str, outbox: Outbox
) -> None:
    settings = settings_for(database_url, None)
    await publish(database, outbox, 50_001)
    now = _now()
    async with database.write() as conn:
        await dispatch_events(conn, service, ["http://127.0.0.1:9/"], 10_000, now)
        [stale] = await claim_due_deliveries(
            conn, service, now=now, lease_seconds=60, limit=100, max_attempts=4
        )
        later = now + timedelta(seconds=61)
        [current] = await claim_due_deliveries(
            conn, service, now=later, lease_seconds=60, limit=100, max_attempts=4
        )
        labels = await record_outcomes(
            conn, [Outcome(stale, 500, "HTTP 500")], now=later, settings=settings
        )
    assert labels == ["stale"] and current.attempt == 2
    row = await delivery_row(database, stale.id)
    assert row.lease_until is not None and row.last_status is None  # the new holder's lease


async def test_worker_keeps_going_while_the_database_is_down() -> None:
    settings = settings_for("postgresql://postgres@127.0.0.1:1/nowhere", "http://127.0.0.1:9/")
    down = Database.from_settings(settings)  # nothing listens on port 1
    worker = OutboxWorker(down, settings, "shop")
    worker.start()
    try:

        async def failed_twice() -> bool:
            return worker.consecutive_errors >= 2

        await eventually(failed_twice)
        assert worker.state == "running" and worker.last_error
        assert worker.last_error.isidentifier()  # the class name, never the message
    finally:
        await asyncio.wait_for(worker.stop(), 5)
        await down.dispose()
    assert worker.state == "stopped"


# --- ids, retention, health ------------------------------------------------------------------


async def test_ids_are_never_reused_after_the_newest_rows_are_purged(
    database: Database, service: str, outbox: Outbox
) -> None:
    """SQLite hands out max(id)+1 without AUTOINCREMENT; the purge deletes the newest rows."""
    old_ids = [await publish(database, outbox, n) for n in range(3)]
    old = datetime.now(UTC) - timedelta(days=30)
    async with database.write() as conn:
        await dispatch_events(conn, service, ["http://127.0.0.1:9/"], 10_000, old)
        await conn.execute(
            update(deliveries)
            .where(deliveries.c.service == service)
            .values(state="delivered", delivered_at=old)
        )
        top_event = (await conn.execute(select(func.max(events.c.id)))).scalar_one()
        top_delivery = (await conn.execute(select(func.max(deliveries.c.id)))).scalar_one()
        cutoff = datetime.now(UTC) - timedelta(days=7)
        assert await store.purge_delivered(conn, service, cutoff, 1000) == 3
        assert await store.purge_settled_events(conn, service, cutoff, 1000) == 3
    new_id = await publish(database, outbox, 99)
    async with database.write() as conn:
        await dispatch_events(conn, service, ["http://127.0.0.1:9/"], 10_000, _now())
        new_delivery = (
            await conn.execute(select(deliveries.c.id).where(deliveries.c.service == service))
        ).scalar_one()
    assert new_id not in old_ids and new_id > max(old_ids)  # UUIDv7s sort by time
    assert await internal_id(database, new_id) > top_event
    assert new_delivery > top_delivery


async def test_retention_purge_keeps_failed_and_owed_deliveries(
    database: Database, database_url: str, service: str, outbox: Outbox
) -> None:
    """Old delivered history goes; failed and pending deliveries, and their events, stay."""
    old = datetime.now(UTC) - timedelta(days=30)
    ids = [await internal_id(database, await publish(database, outbox, n)) for n in range(3)]
    async with database.write() as conn:
        await conn.execute(update(events).where(events.c.id.in_(ids)).values(dispatched_at=old))
        for event_id, state in zip(ids, ["delivered", "failed", "pending"], strict=True):
            await conn.execute(
                insert(deliveries).values(
                    service=service,
                    event_id=event_id,
                    url="http://127.0.0.1:9/",
                    state=state,
                    attempts=1,
                    next_attempt_at=old,
                    created_at=old,
                    delivered_at=old if state == "delivered" else None,
                )
            )
    assert await run_if_due(database, purge_job(settings_for(database_url, None), service)) == 2
    async with database.read() as conn:
        left_events = set(
            (await conn.execute(select(events.c.id).where(events.c.id.in_(ids)))).scalars()
        )
        left_states = set(
            (
                await conn.execute(select(deliveries.c.state).where(deliveries.c.event_id.in_(ids)))
            ).scalars()
        )
    assert left_events == {ids[1], ids[2]}
    assert left_states == {"failed", "pending"}


async def test_health_counts_stop_at_their_cap(
    database: Database, service: str, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog past the cap is reported as the cap, so /health stays cheap under any backlog."""
    monkeypatch.setattr(store, "HEALTH_COUNT_CAP", 3)
    created = datetime.now(UTC) - timedelta(seconds=30)
    async with database.write() as conn:
        await conn.run_sync(lambda c: outbox.publish_many(c, EVENT, ["{}"] * 5, created_at=created))
    async with database.read() as conn:
        summary = await store.outbox_summary(conn, service, datetime.now(UTC))
    assert summary["undispatched_events"] == 3
    assert summary["counts_capped_at"] == 3
    assert summary["oldest_pending_age_seconds"] >= 30


# --- settings and signatures -----------------------------------------------------------------


@pytest.mark.parametrize("secret", ["", "short", "keel-dev-webhook-secret"])
@pytest.mark.parametrize("env", ["dev", "production"])
def test_webhook_urls_without_a_real_secret_are_refused(secret: str, env: str) -> None:
    with pytest.raises(ValidationError, match="KEEL_SHOP_WEBHOOK_SECRET"):
        ShopSettings(env=env, webhook_urls=["https://hooks.test/"], webhook_secret=secret)


def test_no_secret_is_needed_without_urls() -> None:
    assert ShopSettings(webhook_secret="").webhook_urls == []
    assert ShopSettings(webhook_urls=["https://hooks.test/"], webhook_secret=SECRET).webhook_urls


def test_publishing_an_undeclared_event_type_is_refused(outbox: Outbox) -> None:
    with pytest.raises(ValueError, match="does not publish"):
        outbox.rows("order.lost", ["{}"])


def test_signature_verification() -> None:
    body = b'{"id":"0190"}'
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
        ShopSettings(webhook_timeout_seconds=5.0, webhook_lease_seconds=lease)


async def test_health_reads_the_backlog_at_most_once_a_ttl(
    database: Database, outbox: Outbox, service: str
) -> None:
    """An unauthenticated flood of /health costs one summary read a second, not one each."""
    now = [100.0]
    summaries = outbox_service.SummaryCache(ttl=1.0, clock=lambda: now[0])
    first = await outbox_service.health(database, None, service, summaries)
    await publish(database, outbox, 1)
    cached = await outbox_service.health(database, None, service, summaries)
    assert cached == first  # within the ttl: the event published since is not counted yet
    now[0] += 1.0
    fresh = await outbox_service.health(database, None, service, summaries)
    assert fresh["outbox"]["undispatched_events"] == first["outbox"]["undispatched_events"] + 1
