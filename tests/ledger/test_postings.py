"""Posting transactions and transfers: the balance rules and what gets written."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import asyncpg
import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from keel.core.database import Database
from keel.core.idempotency import IdempotencyStore
from keel.core.outbox.tables import events as outbox
from keel.ledger.postings import Posting, apply_batch
from keel.ledger.tables import entries, users
from tests.ledger.helpers import deposit, new_user
from tests.support.ledger import row_counts


async def _entry_count(database: Database, user_id: int) -> int:
    async with database.read() as conn:
        return (
            await conn.execute(select(func.count()).where(entries.c.user_id == user_id))
        ).scalar_one()


async def test_deposit_then_withdraw_tracks_balance_after(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    first = await deposit(client, user["id"], 1_000)
    second = await client.post(
        "/transactions", json={"user_id": user["id"], "amount": -300, "description": "rent"}
    )
    assert first["balance_after"] == 1_000
    assert second.status_code == 201
    assert second.json()["balance_after"] == 700
    assert second.json()["status"] == "posted"
    assert (await client.get(f"/users/{user['id']}")).json()["balance"] == 700


async def test_legacy_path_posts_too(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    response = await client.post("/transaction", json={"user_id": user["id"], "amount": 5})
    assert response.status_code == 201
    assert response.json()["balance_after"] == 5


async def test_overdraft_refused_and_nothing_written(
    client: httpx.AsyncClient, database: Database
) -> None:
    user = await new_user(client, overdraft_limit=50)
    await deposit(client, user["id"], 100)
    ok = await client.post("/transactions", json={"user_id": user["id"], "amount": -150})
    refused = await client.post("/transactions", json={"user_id": user["id"], "amount": -1})
    assert ok.status_code == 201 and ok.json()["balance_after"] == -50
    assert refused.status_code == 422
    assert refused.json()["code"] == "insufficient_funds"
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert await _entry_count(database, user["id"]) == 2
    async with database.read() as conn:
        balance = (
            await conn.execute(select(users.c.balance).where(users.c.id == user["id"]))
        ).scalar_one()
    assert balance == -50


async def test_each_posting_writes_entry_and_outbox_event(
    client: httpx.AsyncClient, database: Database
) -> None:
    user = await new_user(client)
    posted = await deposit(client, user["id"], 42)
    async with database.read() as conn:
        rows = (
            await conn.execute(
                select(outbox.c.service, outbox.c.event_type, outbox.c.payload, outbox.c.event_id)
            )
        ).all()
    events = [(service, kind, json.loads(payload)) for service, kind, payload, _ in rows]
    assert ("ledger", "transaction.posted", posted) in events
    assert all(event_id.version == 7 for *_, event_id in rows)


async def test_transfer_writes_both_entries(client: httpx.AsyncClient, database: Database) -> None:
    alice, bob = await new_user(client), await new_user(client)
    await deposit(client, alice["id"], 500)
    response = await client.post(
        "/transfers",
        json={
            "from_user_id": alice["id"],
            "to_user_id": bob["id"],
            "amount": 200,
            "description": "lunch",
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert [e["amount"] for e in body["entries"]] == [-200, 200]
    assert [e["balance_after"] for e in body["entries"]] == [300, 200]
    assert (await client.get(f"/users/{bob['id']}")).json()["balance"] == 200


async def test_refused_transfer_writes_neither_entry(
    client: httpx.AsyncClient, database: Database
) -> None:
    alice, bob = await new_user(client), await new_user(client)
    await deposit(client, alice["id"], 10)
    response = await client.post(
        "/transfers", json={"from_user_id": alice["id"], "to_user_id": bob["id"], "amount": 11}
    )
    assert response.status_code == 422
    assert response.json()["code"] == "insufficient_funds"
    assert await _entry_count(database, alice["id"]) == 1
    assert await _entry_count(database, bob["id"]) == 0


async def test_transfer_to_unknown_user_writes_nothing(
    client: httpx.AsyncClient, database: Database
) -> None:
    alice = await new_user(client)
    await deposit(client, alice["id"], 10)
    response = await client.post(
        "/transfers", json={"from_user_id": alice["id"], "to_user_id": 2**62, "amount": 5}
    )
    assert response.status_code == 404
    assert response.json()["code"] == "user_not_found"
    assert await _entry_count(database, alice["id"]) == 1


async def test_concurrent_postings_in_one_batch_are_each_all_or_nothing(
    client: httpx.AsyncClient, database: Database
) -> None:
    user = await new_user(client)
    await deposit(client, user["id"], 10)
    replies = await asyncio.gather(
        *(
            client.post("/transactions", json={"user_id": user["id"], "amount": -1})
            for _ in range(25)
        )
    )
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(201) == 10 and statuses.count(422) == 15
    assert await _entry_count(database, user["id"]) == 11
    assert (await client.get(f"/users/{user['id']}")).json()["balance"] == 0
    assert (await client.get("/audit")).json()["ok"] is True


async def test_a_batch_whose_writes_fail_leaves_nothing_behind(
    client: httpx.AsyncClient, database: Database
) -> None:
    """The batch's writes (raw asyncpg on PostgreSQL) run inside its one transaction."""
    alice, bob = await new_user(client), await new_user(client)
    await deposit(client, alice["id"], 100)
    before = await row_counts(database)
    store = IdempotencyStore(timedelta(hours=1))
    batch = [
        Posting.transaction(alice["id"], -30, "fine", None),
        Posting.transfer_between(alice["id"], bob["id"], 20, "fine too", None),
        # The API refuses a zero amount; past it, the entries' CHECK constraint fails the insert.
        Posting.transaction(bob["id"], 0, "breaks the batch's write", None),
    ]
    with pytest.raises((IntegrityError, asyncpg.IntegrityConstraintViolationError)):
        await database.run_write(lambda conn: apply_batch(conn, store, batch))
    assert await row_counts(database) == before
    assert (await client.get(f"/users/{alice['id']}")).json()["balance"] == 100
    assert (await client.get(f"/users/{bob['id']}")).json()["balance"] == 0


async def test_history_newest_first_with_cursor(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    for amount in (1, 2, 3, 4, 5):
        await deposit(client, user["id"], amount)
    first = (await client.get(f"/users/{user['id']}/transactions", params={"limit": 3})).json()
    second = (
        await client.get(
            f"/users/{user['id']}/transactions", params={"limit": 3, "cursor": first["next_cursor"]}
        )
    ).json()
    assert [t["amount"] for t in first["items"]] == [5, 4, 3]
    assert [t["balance_after"] for t in first["items"]] == [15, 10, 6]
    assert [t["amount"] for t in second["items"]] == [2, 1]
    assert second["next_cursor"] is None


@pytest.mark.parametrize(
    "text",
    [
        "'; DROP TABLE ledger_entries; --",
        "$1 $14 ?, %s %(x)s \\ '' \" ) ;",
        "{1,2} ARRAY['x'] ✓ ünïcode",
    ],
)
async def test_descriptions_are_stored_verbatim(
    client: httpx.AsyncClient, database: Database, text: str
) -> None:
    """Descriptions reach the batch's statements as bound parameters, on both engines."""
    alice, bob = await new_user(client), await new_user(client)
    posted = await client.post(
        "/transactions", json={"user_id": alice["id"], "amount": 50, "description": text}
    )
    transfer = {"from_user_id": alice["id"], "to_user_id": bob["id"], "amount": 20}
    moved = await client.post("/transfers", json={**transfer, "description": text})
    assert posted.status_code == 201 and moved.status_code == 201, (posted.text, moved.text)
    async with database.read() as conn:
        stored = (
            await conn.execute(
                select(entries.c.description).where(entries.c.user_id.in_([alice["id"], bob["id"]]))
            )
        ).scalars()
        assert list(stored) == [text, text, text]
    assert (await client.get("/audit")).json()["ok"] is True
