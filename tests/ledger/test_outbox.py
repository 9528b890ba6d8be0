"""The ledger's webhooks through the core outbox: each posting announced, signed, retried."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete

from keel.core.auth import Scope
from keel.core.database import Database
from keel.core.outbox.signatures import verify_signature
from keel.core.outbox.store import retry_delay
from keel.core.outbox.tables import deliveries
from keel.ledger.app import create_app
from keel.ledger.registration import MIGRATIONS
from keel.ledger.settings import LedgerSettings
from tests import backends
from tests.ledger.helpers import deposit, new_user
from tests.support.webhooks import (
    SECRET,
    Receiver,
    counter,
    eventually,
    in_state,
    running_receiver,
)

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


@pytest.fixture
async def receiver(database: Database) -> AsyncIterator[Receiver]:
    async with running_receiver() as rx:
        yield rx
    async with database.write() as conn:  # each test owns its rows, also in a shared PostgreSQL
        await conn.execute(delete(deliveries).where(deliveries.c.url == rx.url))


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


# --- the tests ---------------------------------------------------------------------------------


async def test_delivery_arrives_signed_with_the_event(
    client: httpx.AsyncClient, receiver: Receiver, database: Database
) -> None:
    user = await new_user(client)
    posted = await deposit(client, user["id"], 1_234)
    await receiver.wait_for(lambda: bool(receiver.for_data(posted["id"])))
    [got] = receiver.for_data(posted["id"])
    assert verify_signature(SECRET, got.headers["keel-signature"], got.body)
    assert not verify_signature("another-secret", got.headers["keel-signature"], got.body)
    assert got.event["type"] == "transaction.posted"
    assert got.event["data"] == posted
    assert got.headers["content-type"] == "application/json"
    assert got.headers["keel-event-id"] == got.event["id"]
    assert uuid.UUID(got.event["id"]).version == 7
    assert got.attempt == 1
    row = await eventually(lambda: in_state(database, got.delivery_id, "delivered"))
    assert row.attempts == 1 and row.last_status == 204 and row.lease_until is None
    listing = await client.get("/webhooks/deliveries", params={"event_id": got.event["id"]})
    assert listing.status_code == 200
    [item] = listing.json()["items"]
    assert item["state"] == "delivered" and item["url"] == receiver.url
    assert item["event_id"] == got.event["id"] and item["id"] == got.delivery_id
    assert item["delivered_at"] is not None and item["last_error"] is None


async def test_failing_receiver_is_retried_with_backoff_until_it_succeeds(
    client: httpx.AsyncClient,
    receiver: Receiver,
    database: Database,
    ledger_settings: LedgerSettings,
) -> None:
    receiver.fail_first = 3
    retrying_before = counter("ledger", "retrying")
    user = await new_user(client)
    posted = await deposit(client, user["id"], 5)
    await receiver.wait_for(lambda: len(receiver.for_data(posted["id"])) == 4)
    got = receiver.for_data(posted["id"])
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
    assert counter("ledger", "retrying") >= retrying_before + 3


async def test_gives_up_after_max_attempts_and_lists_it_as_failed(
    client: httpx.AsyncClient, receiver: Receiver, database: Database
) -> None:
    receiver.status = 503
    failed_before = counter("ledger", "failed")
    user = await new_user(client)
    posted = await deposit(client, user["id"], 9)
    await receiver.wait_for(lambda: bool(receiver.for_data(posted["id"])))
    event_id = receiver.for_data(posted["id"])[0].event["id"]

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
    assert counter("ledger", "failed") >= failed_before + 1


async def test_posting_returns_while_the_receiver_hangs(
    client: httpx.AsyncClient, receiver: Receiver, database: Database
) -> None:
    receiver.hang = True
    user = await new_user(client)
    first = await deposit(client, user["id"], 1)
    await receiver.wait_for(lambda: bool(receiver.for_data(first["id"])))
    # The worker is now stuck in a request that will not end on its own for 30 s.
    second = await asyncio.wait_for(
        client.post("/transactions", json={"user_id": user["id"], "amount": 2}), 5
    )
    assert second.status_code == 201
    await receiver.wait_for(lambda: bool(receiver.for_data(second.json()["id"])))
    health = (await client.get("/health")).json()["outbox"]
    assert health["pending_deliveries"] >= 2 and health["worker"] == "running"
    receiver.release.set()
    for posted in (first, second.json()):
        delivery_id = receiver.for_data(posted["id"])[0].delivery_id
        await eventually(lambda d=delivery_id: in_state(database, d, "delivered"))


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
        await receiver.wait_for(lambda p=p: bool(receiver.for_data(p["id"])))
    mine = sorted(receiver.for_data(p["id"])[0].delivery_id for p in posted)
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


def test_webhook_urls_without_a_secret_stop_the_ledger_from_starting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEEL_LEDGER_WEBHOOK_URLS", "https://hooks.test/a,https://hooks.test/b")
    monkeypatch.delenv("KEEL_LEDGER_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("KEEL_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ValueError, match="KEEL_LEDGER_WEBHOOK_SECRET"):
        create_app()
    monkeypatch.setenv("KEEL_LEDGER_WEBHOOK_SECRET", "a-real-secret-of-some-length")
    assert LedgerSettings().webhook_urls == ["https://hooks.test/a", "https://hooks.test/b"]
