"""Hostile review of the inventory (wt/review2): each test here fails on main at 320330c.

Ranked in the report; each names the bug it proves in its docstring.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text, update
from sqlalchemy.engine import Connection

from keel.core.database import Database, create_engine
from keel.core.errors import sqlstate_of
from keel.core.idempotency import IdempotencyStore
from keel.inventory import service, stock
from keel.inventory.audit import audit_stock
from keel.inventory.purchases import Purchase, apply_batch
from keel.inventory.schemas import MAX_STOCK, ItemCreate, ReservationCreate
from keel.inventory.tables import reservations
from tests.inventory.test_basics import counts, new_item
from tests.support.ledger import create_key
from tests.support.live_server import LiveServer


async def test_restock_past_the_largest_count_is_refused_not_a_5xx(
    shop: httpx.AsyncClient,
) -> None:
    """``initial + restocked + quantity`` is computed in BIGINT: 2**62 + 2**62 overflows on
    PostgreSQL (22003), so a documented 422 ``stock_out_of_range`` becomes a 503."""
    item = await new_item(shop, MAX_STOCK)
    reply = await shop.post(f"/items/{item['id']}/restock", json={"quantity": MAX_STOCK})
    assert (reply.status_code, reply.json()["code"]) == (422, "stock_out_of_range"), reply.text
    assert await counts(shop, item["id"]) == (MAX_STOCK, 0, 0)


def _pid(conn: Connection) -> int:
    return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())


async def _until_blocked_by(database: Database, holder: int, waiters: int = 1) -> None:
    """Poll until ``waiters`` backends wait, on ``holder`` or on a waiter queued before them
    for the same row (deadline 10 s)."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE cardinality(pg_blocking_pids(pid)) > 0"
        " AND pid <> :holder AND datname = current_database()"
    )
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        async with database.read() as conn:
            if (await conn.execute(query, {"holder": holder})).scalar_one() >= waiters:
                return
        assert asyncio.get_running_loop().time() < deadline, "nobody waited on the lock"
        await asyncio.sleep(0.02)


async def _a_limited_purchase_racing(
    shop: httpx.AsyncClient, database: Database, item_id: int, route: Any
) -> tuple[httpx.Response, str | None]:
    """A limited purchase of user u against ``route`` (cancel, release: item row, then
    holdings row), its statements interleaved with the route's by hand.

    The purchase runs them as purchases._take_limited does: the item's stock row, then the
    holding. (Before the fix it took the holding first: a lock cycle, 1 s, one side 503.)
    Returns the route's reply and the SQLSTATE the purchase batch failed with, if any.
    """
    failed = None
    async with database.write() as batch:
        assert await batch.run_sync(stock.take, item_id, 1) is not None
        racing = asyncio.create_task(route())
        await _until_blocked_by(database, await batch.run_sync(_pid))
        try:
            async with batch.begin_nested():
                assert await batch.run_sync(stock.add_holding, item_id, "u", 1, 5)
        except Exception as exc:
            failed = sqlstate_of(exc)
    return await racing, failed


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_cancel_racing_a_limited_purchase_of_the_same_user_does_not_deadlock(
    shop: httpx.AsyncClient, database: Database
) -> None:
    """A purchase (or a reserve) locks the user's holdings row, then the item's; a cancel locks
    the item's, then the holdings row (service.cancel: give_back before drop_holding). The cycle
    costs PostgreSQL's deadlock_timeout (1 s) and then one side: here the cancel, 503."""
    item = await new_item(shop, 10, max_per_user=5)
    order = (await shop.post("/purchase", json={"item_id": item["id"], "user_id": "u"})).json()
    reply, batch_failed = await _a_limited_purchase_racing(
        shop,
        database,
        item["id"],
        lambda: shop.post(f"/orders/{order['order_id']}/cancel"),
    )
    assert (reply.status_code, batch_failed) == (200, None), reply.text


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_release_racing_a_limited_purchase_of_the_same_user_does_not_deadlock(
    shop: httpx.AsyncClient, database: Database
) -> None:
    """service.release: give_back (item row) before drop_holding (holdings row); the sweeper
    (expire_due) locks them the other way round, like purchases and reserves."""
    item = await new_item(shop, 10, max_per_user=5)
    hold = (await shop.post("/reservations", json={"item_id": item["id"], "user_id": "u"})).json()
    reply, batch_failed = await _a_limited_purchase_racing(
        shop,
        database,
        item["id"],
        lambda: shop.delete(f"/reservations/{hold['reservation_id']}"),
    )
    assert (reply.status_code, batch_failed) == (204, None), reply.text


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_two_purchase_batches_never_lock_in_a_cycle(
    shop: httpx.AsyncClient, database: Database
) -> None:
    """purchases._take_stock claims "one lock order for every process: no deadlock cycles", but
    _reserve_limits upserts holdings rows in arrival order first: two processes' batches of the
    same buyer's two limited items, arrived in opposite orders, deadlock (each batch, up to 512
    purchases, stalls 1 s; four in a row and the whole batch is answered 503)."""
    first = await new_item(shop, 10, max_per_user=5)
    second = await new_item(shop, 10, max_per_user=5)
    for item in (first, second):  # the buyer's holdings rows exist
        assert (
            await shop.post("/purchase", json={"item_id": item["id"], "user_id": "u"})
        ).status_code == 201
    store = IdempotencyStore(ttl=timedelta(hours=1))
    failures: list[str | None] = []

    async def batch(order: list[dict[str, Any]], pids: list[int]) -> None:
        try:
            async with database.write() as conn:
                pids.append(await conn.run_sync(_pid))
                purchases = [Purchase(item["id"], "u", 1) for item in order]
                await conn.run_sync(apply_batch, store, purchases)
        except Exception as exc:
            failures.append(sqlstate_of(exc))

    async with database.write() as gate:  # holds both rows each batch locks until both wait
        await gate.execute(
            text(
                "SELECT 1 FROM inventory_holdings WHERE user_id = 'u' AND item_id IN (:a, :b)"
                " FOR UPDATE"
            ),
            {"a": first["id"], "b": second["id"]},
        )
        await gate.execute(
            text("SELECT 1 FROM inventory_items WHERE id IN (:a, :b) FOR UPDATE"),
            {"a": first["id"], "b": second["id"]},
        )
        one: list[int] = []
        two: list[int] = []
        batches = [
            asyncio.create_task(batch([first, second], one)),
            asyncio.create_task(batch([second, first], two)),
        ]
        await _until_blocked_by(database, await gate.run_sync(_pid), waiters=2)
    await asyncio.gather(*batches)
    assert failures == [], failures
    assert await counts(shop, first["id"]) == (7, 0, 3)


LIVE_ROUNDS = 8
LIVE_OPS = 120


@pytest.mark.slow
async def test_mixed_operations_on_three_processes_keep_every_count_and_event(
    postgres_url: str, tmp_path: Path
) -> None:
    """Purchases (some retried under one key, racing themselves), holds of 1 s, confirms,
    releases, cancels and restocks on three worker processes (three sweepers) of one
    PostgreSQL database; then every count, holding and event is checked in the database."""
    admin = await create_key(postgres_url)
    server = LiveServer(
        postgres_url, tmp_path, workers=3, service="inventory", env={"KEEL_DB_POOL_SIZE": "4"}
    ).start()
    rng = random.Random(9)
    replies: list[tuple[str, httpx.Response]] = []
    keyed: dict[str, list[httpx.Response]] = defaultdict(list)
    try:
        async with httpx.AsyncClient(
            base_url=server.base_url,
            headers={"Authorization": f"Bearer {admin}"},
            limits=httpx.Limits(max_connections=32, keepalive_expiry=1.0),
            timeout=httpx.Timeout(60.0),
        ) as shop:
            ids = [
                (await new_item(shop, 20, max_per_user=3))["id"],
                (await new_item(shop, 15))["id"],
                (await new_item(shop, 4, max_per_user=2))["id"],
            ]
            holds: list[int] = []
            orders: list[int] = []

            def one() -> Any:
                kind = rng.choice(
                    ["buy"] * 5 + ["keyed"] * 2 + ["hold"] * 3 + ["confirm", "release", "cancel"]
                )
                body = {
                    "item_id": rng.choice(ids),
                    "user_id": f"u{rng.randrange(3)}",
                    "quantity": rng.choice([1, 1, 2]),
                }
                if kind == "keyed":
                    key = f"k{rng.randrange(10**9)}"
                    return (
                        kind,
                        key,
                        shop.post("/purchase", json=body, headers={"Idempotency-Key": key}),
                    )
                if kind == "hold":
                    return kind, None, shop.post("/reservations", json={**body, "ttl_seconds": 1})
                if kind in ("confirm", "release") and holds:
                    rid = rng.choice(holds)
                    if kind == "confirm":
                        return kind, None, shop.post(f"/reservations/{rid}/confirm")
                    return kind, None, shop.delete(f"/reservations/{rid}")
                if kind == "cancel" and orders:
                    return kind, None, shop.post(f"/orders/{rng.choice(orders)}/cancel")
                if rng.random() < 0.05:
                    return (
                        "restock",
                        None,
                        shop.post(f"/items/{body['item_id']}/restock", json={"quantity": 2}),
                    )
                return "buy", None, shop.post("/purchase", json=body)

            for _ in range(LIVE_ROUNDS):
                planned = [one() for _ in range(LIVE_OPS)]
                # every keyed purchase is sent twice at once: a client retrying on a timeout
                planned += [p for p in planned if p[0] == "keyed"]
                kinds = [(kind, key) for kind, key, _ in planned]
                done = await asyncio.gather(*(call for _, _, call in planned))
                for (kind, key), reply in zip(kinds, done, strict=True):
                    replies.append((kind, reply))
                    if key is not None:
                        keyed[key].append(reply)
                    if reply.status_code == 201 and kind == "hold":
                        holds.append(reply.json()["reservation_id"])
                    if reply.status_code == 201 and kind in ("buy", "keyed", "confirm"):
                        orders.append(reply.json()["order_id"])
            # every hold has expired, been confirmed or released; the sweepers return the rest
            database = Database(create_engine(postgres_url))
            try:
                deadline = asyncio.get_running_loop().time() + 20
                while await _held(database, ids):
                    assert asyncio.get_running_loop().time() < deadline, "holds not swept"
                    await asyncio.sleep(0.1)
                problems = await _live_problems(database, ids, keyed)
            finally:
                await database.dispose()
    finally:
        server.stop()
    assert problems == []
    server_errors = [(kind, r.status_code, r.text) for kind, r in replies if r.status_code >= 500]
    assert server_errors == []


async def _held(database: Database, ids: list[int]) -> int:
    async with database.read() as conn:
        query = text(
            "SELECT count(*) FROM inventory_reservations WHERE state = 'held' AND item_id = ANY(:i)"
        )
        return int((await conn.execute(query, {"i": ids})).scalar_one())


async def _live_problems(
    database: Database, ids: list[int], keyed: dict[str, list[httpx.Response]]
) -> list[str]:
    problems: list[str] = []
    async with database.read() as conn:
        audit = await conn.run_sync(audit_stock)
        problems += [p for p in audit.problems if int(re.findall(r"\d+", p)[0]) in ids]
        rows = await conn.execute(
            text(
                "SELECT h.item_id, h.user_id, h.quantity, i.max_per_user,"
                " (SELECT coalesce(sum(quantity), 0) FROM inventory_orders o WHERE o.item_id ="
                "  h.item_id AND o.user_id = h.user_id AND o.state = 'placed')"
                " + (SELECT coalesce(sum(quantity), 0) FROM inventory_reservations r WHERE"
                "  r.item_id = h.item_id AND r.user_id = h.user_id AND r.state = 'held')"
                " FROM inventory_holdings h JOIN inventory_items i ON i.id = h.item_id"
                " WHERE h.item_id = ANY(:i)"
            ),
            {"i": ids},
        )
        for item_id, user, held, limit, explained in rows:
            if held != explained or held > limit:
                problems.append(f"holding {item_id}/{user}: {held}, explained {explained}")
        events: dict[str, Counter[int]] = defaultdict(Counter)
        for event_type, payload in await conn.execute(
            text(
                "SELECT event_type, payload FROM keel_outbox_events WHERE service = 'inventory'"
                " AND event_type <> 'item.sold_out' AND (payload::jsonb ->> 'item_id')::bigint"
                " = ANY(:i)"
            ),
            {"i": ids},
        ):
            body = json.loads(payload)
            events[event_type][body.get("order_id") or body.get("reservation_id")] += 1
        placed = Counter(
            oid
            for (oid,) in await conn.execute(
                text("SELECT id FROM inventory_orders WHERE item_id = ANY(:i)"), {"i": ids}
            )
        )
        cancelled = Counter(
            oid
            for (oid,) in await conn.execute(
                text(
                    "SELECT id FROM inventory_orders WHERE state = 'cancelled'"
                    " AND item_id = ANY(:i)"
                ),
                {"i": ids},
            )
        )
        expired = Counter(
            rid
            for (rid,) in await conn.execute(
                text(
                    "SELECT id FROM inventory_reservations WHERE state = 'expired'"
                    " AND item_id = ANY(:i)"
                ),
                {"i": ids},
            )
        )
    for name, wanted in (
        ("order.placed", placed),
        ("order.cancelled", cancelled),
        ("reservation.expired", expired),
    ):
        if events[name] != wanted:
            problems.append(f"{name}: events {dict(events[name])} != rows {dict(wanted)}")
    for key, answers in keyed.items():
        bought = {r.json()["order_id"] for r in answers if r.status_code == 201}
        if len(bought) > 1:
            problems.append(f"key {key} bought {sorted(bought)}")
    return problems


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_the_sweep_costs_a_few_statements_however_many_holds_expire(
    database_url: str,
) -> None:
    """service.expire_due issues one ``drop_holding`` UPDATE per expired hold (even on items
    with no limit, where it changes nothing): 1,000 round trips per sweep, inside the write
    transaction (on SQLite, the database's only write lock; on PostgreSQL every process's
    sweeper picks the same oldest 1,000 and waits on the first one's row locks)."""
    engine = create_engine(database_url)
    database = Database(engine)
    statements: list[str] = []
    try:
        async with database.write() as conn:
            item = await conn.run_sync(
                service.create_item,
                ItemCreate(sku=f"sweep-{uuid.uuid4().hex}", name="W", stock=500),
            )
            for i in range(200):
                await conn.run_sync(
                    service.reserve,
                    ReservationCreate(item_id=item.id, user_id=f"s{i}", quantity=1),
                    f"s{i}",
                    900,
                )
            await conn.execute(
                update(reservations)
                .where(reservations.c.item_id == item.id)
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )

        def count(*args: Any) -> None:
            statements.append(str(args[2])[:40])

        event.listen(engine.sync_engine, "before_cursor_execute", count)
        swept = await database.run_write(service.expire_due)
        event.remove(engine.sync_engine, "before_cursor_execute", count)
        async with database.read() as conn:
            left = await conn.run_sync(service.get_item, item.id)
    finally:
        await database.dispose()
    assert swept >= 200 and (left.available, left.reserved) == (500, 0)
    assert len(statements) <= 10, f"{len(statements)} statements: {statements[:4]} ..."


async def test_a_purchase_refused_sold_out_does_not_count_against_a_later_one(
    shop: httpx.AsyncClient, database: Database
) -> None:
    """One batch (two taps of one buyer, max_per_user 2, one unit left): the limits of the whole
    batch are counted before any stock is taken, so the 1-unit purchase is refused
    ``limit_exceeded`` on the strength of the 2-unit one, which is then refused ``sold_out``
    and its holding given back. Run one after the other, the 1-unit purchase is granted:
    the batch undersells (the unit stays unsold) and names the wrong reason."""
    item = await new_item(shop, 1, max_per_user=2)
    store = IdempotencyStore(ttl=timedelta(hours=1))
    batch = [Purchase(item["id"], "u", 2), Purchase(item["id"], "u", 1)]
    async with database.write() as conn:
        await conn.run_sync(apply_batch, store, batch)
    assert [type(p.result).__name__ for p in batch] == ["SoldOut", "Order"]
    assert await counts(shop, item["id"]) == (0, 0, 1)


async def test_the_audit_checks_holdings_against_orders_and_holds(
    shop: httpx.AsyncClient, database: Database
) -> None:
    """audit.py checks items against orders and holds, but never ``inventory_holdings``: a
    holding that drifted above what the buyer holds refuses them ``limit_exceeded`` (an
    undersell) and ``keel inventory audit`` / ``keel prove inventory`` still say all is well."""
    item = await new_item(shop, 10, max_per_user=2)
    bought = await shop.post("/purchase", json={"item_id": item["id"], "user_id": "d"})
    assert bought.status_code == 201
    async with database.write() as conn:  # the drift a lost drop_holding would leave
        await conn.execute(
            text("UPDATE inventory_holdings SET quantity = 2 WHERE item_id = :i AND user_id = 'd'"),
            {"i": item["id"]},
        )
    refused = await shop.post("/purchase", json={"item_id": item["id"], "user_id": "d"})
    assert refused.json()["code"] == "limit_exceeded"  # the buyer holds 1 of 2
    async with database.read() as conn:
        report = await conn.run_sync(audit_stock)
    assert any(f"{item['id']}" in p and "holding" in p for p in report.problems), report.problems
