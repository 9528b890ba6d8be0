"""Idempotency keys inside one group-commit batch, and between batches that share keys.

A batch claims all its keys at once, in identity order; these tests hand batches straight to
:func:`keel.ledger.postings.apply_batch` so they decide what shares a batch, and read the verdict
from the database.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import make_url

from keel.core.database import Database, create_engine
from keel.core.errors import IdempotencyKeyReused
from keel.core.idempotency import IdempotencyStore, IdempotentRequest, request_fingerprint
from keel.core.tables import idempotency_keys
from keel.ledger.errors import InsufficientFunds
from keel.ledger.postings import Posting, apply_batch
from keel.ledger.tables import entries
from tests.backends import _plain_pg
from tests.ledger.helpers import deposit, new_user

TTL = timedelta(hours=1)


def _keyed(user_id: int, amount: int, key: str, api_key_id: int = 1) -> Posting:
    payload = {"user_id": user_id, "amount": amount, "description": key}
    idem = IdempotentRequest(
        "ledger", api_key_id, key, request_fingerprint("ledger.post_transaction", payload)
    )
    return Posting.transaction(user_id, amount, key, idem)


async def _apply(database: Database, batch: list[Posting], store: IdempotencyStore) -> None:
    await database.run_write(lambda conn: apply_batch(conn, store, batch))


async def _records(database: Database, keys: list[str]) -> dict[str, Any]:
    async with database.read() as conn:
        rows = await conn.execute(select(idempotency_keys).where(idempotency_keys.c.key.in_(keys)))
        return {row.key: row for row in rows}


async def _entries_of(database: Database, user_id: int) -> list[Any]:
    async with database.read() as conn:
        query = select(entries).where(entries.c.user_id == user_id).order_by(entries.c.id)
        return list(await conn.execute(query))


async def test_same_key_twice_in_one_batch_posts_once(
    client: httpx.AsyncClient, database: Database
) -> None:
    user = await new_user(client)
    key, other = f"twice-{uuid.uuid4()}", f"twice-{uuid.uuid4()}"
    first, copy = _keyed(user["id"], 5, key), _keyed(user["id"], 5, key)
    reused_first, reused = _keyed(user["id"], 7, other), _keyed(user["id"], 8, other)
    await _apply(database, [first, copy, reused_first, reused], IdempotencyStore(TTL))

    assert first.result is not None and first.replay is None
    assert copy.error is None and copy.replay is not None
    assert copy.replay.body == first.result.model_dump_json()
    assert reused_first.result is not None
    assert isinstance(reused.error, IdempotencyKeyReused)
    assert [e.amount for e in await _entries_of(database, user["id"])] == [5, 7]
    records = await _records(database, [key, other])
    assert {k: r.response_status for k, r in records.items()} == {key: 201, other: 201}


async def test_replays_reuses_refusals_and_new_keys_in_one_batch(
    client: httpx.AsyncClient, database: Database
) -> None:
    store = IdempotencyStore(TTL)
    user = await new_user(client)
    await deposit(client, user["id"], 10)
    replayed, reused, new, refused = (f"{n}-{uuid.uuid4()}" for n in ("r", "u", "n", "f"))
    earlier = [_keyed(user["id"], 1, replayed), _keyed(user["id"], 2, reused)]
    await _apply(database, earlier, store)

    batch = [
        _keyed(user["id"], 3, new),
        _keyed(user["id"], 2, reused + "x"),  # a new key: keys differ by more than their prefix
        _keyed(user["id"], 1, replayed),
        _keyed(user["id"], -100, refused),
        _keyed(user["id"], 99, reused),  # different body under a used key
        Posting.transaction(user["id"], 4, "no key", None),
    ]
    await _apply(database, batch, store)

    posted, renamed, replay, broke, misused, unkeyed = batch
    assert posted.result is not None and renamed.result is not None and unkeyed.result is not None
    assert replay.replay is not None and earlier[0].result is not None
    assert replay.replay.body == earlier[0].result.model_dump_json()
    assert isinstance(broke.error, InsufficientFunds)
    assert isinstance(misused.error, IdempotencyKeyReused)
    amounts = [e.amount for e in await _entries_of(database, user["id"])]
    assert amounts == [10, 1, 2, 3, 2, 4]
    records = await _records(database, [replayed, reused, reused + "x", new, refused])
    # Only successes are stored; the refused posting's key stays free for its retry.
    assert set(records) == {replayed, reused, reused + "x", new}
    assert all(r.response_status == 201 for r in records.values())
    assert records[reused].request_hash == earlier[1].idempotency.fingerprint  # type: ignore[union-attr]


async def test_expired_key_is_claimed_again_by_a_new_request(
    client: httpx.AsyncClient, database: Database
) -> None:
    store = IdempotencyStore(TTL)
    user = await new_user(client)
    key = f"old-{uuid.uuid4()}"
    await _apply(database, [_keyed(user["id"], 5, key)], store)
    async with database.write() as conn:
        await conn.execute(
            update(idempotency_keys)
            .where(idempotency_keys.c.key == key)
            .values(created_at=datetime.now(UTC) - TTL - timedelta(minutes=1))
        )

    again = _keyed(user["id"], 6, key)  # another body: fine once the first record has expired
    await _apply(database, [again], store)

    assert again.result is not None and again.error is None and again.replay is None
    assert [e.amount for e in await _entries_of(database, user["id"])] == [5, 6]
    record = (await _records(database, [key]))[key]
    assert record.request_hash == again.idempotency.fingerprint  # type: ignore[union-attr]
    assert record.response_body == again.result.model_dump_json()
    assert record.created_at > datetime.now(UTC) - timedelta(minutes=1)


async def _lock_waiters(admin: asyncpg.Connection, database: str) -> int:
    count: int = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
        database,
    )
    return count


async def _wait_for_lock_waiters(admin: asyncpg.Connection, database: str, n: int) -> None:
    deadline = time.monotonic() + 20
    while await _lock_waiters(admin, database) < n:
        assert time.monotonic() < deadline, f"fewer than {n} transactions waiting on a lock"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_crossed_key_orders_in_two_transactions_never_deadlock(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """Two committers' batches hold keys a and b in crossed order, each on an account of its own.

    (Batches sharing keys lock disjoint accounts when a client reuses keys across requests.) A
    third transaction holds an uncommitted claim of key m, which only the first batch sends, after
    a: so the first batch waits there, and the second is started meanwhile. Claimed in arrival
    order, the first would hold a and wait on m, the second hold b and wait on a, and once m is
    free the first would wait on b: PostgreSQL's deadlock error. In identity order (a, b, m) the
    second simply queues on a.
    """
    users = [await new_user(client) for _ in range(2)]
    a, m, b = (f"{name}-{uuid.uuid4()}" for name in "amb")
    first = [
        _keyed(users[0]["id"], 1, a),
        _keyed(users[0]["id"], 3, m),
        _keyed(users[0]["id"], 2, b),
    ]
    second = [_keyed(users[1]["id"], 2, b), _keyed(users[1]["id"], 1, a)]
    store = IdempotencyStore(TTL)
    committers = [Database(create_engine(database_url)) for _ in range(2)]
    name = make_url(database_url).database or ""
    admin = await asyncpg.connect(_plain_pg(database_url))
    blocker = await asyncpg.connect(_plain_pg(database_url))
    try:
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute(
            "INSERT INTO keel_idempotency_keys (service, api_key_id, key, request_hash, created_at)"
            " VALUES ('ledger', 1, $1, '\\x00', now())",
            m,
        )
        runs = [asyncio.create_task(_apply(committers[0], first, store))]
        await _wait_for_lock_waiters(admin, name, 1)
        runs.append(asyncio.create_task(_apply(committers[1], second, store)))
        await _wait_for_lock_waiters(admin, name, 2)
        await holding.rollback()
        done = await asyncio.gather(*runs, return_exceptions=True)
    finally:
        await admin.close()
        await blocker.close()
        for db in committers:
            await db.dispose()

    assert done == [None, None], done
    # Each key took effect exactly once: the first batch posted all three; the second, sending
    # other bodies under a and b, was refused.
    assert all(p.result is not None for p in first)
    assert all(isinstance(p.error, IdempotencyKeyReused) for p in second)
    database = Database(create_engine(database_url))
    try:
        assert [(e.amount, e.description) for e in await _entries_of(database, users[0]["id"])] == [
            (1, a),
            (3, m),
            (2, b),
        ]
        assert await _entries_of(database, users[1]["id"]) == []
        records = await _records(database, [a, b, m])
        assert {k: r.response_status for k, r in records.items()} == {a: 201, b: 201, m: 201}
    finally:
        await database.dispose()
