"""Mixed operations at once, over HTTP, on several worker processes, checked in the database.

Shoppers buy (some retrying under one Idempotency-Key), hold for a second or for 15 minutes,
confirm, release and cancel holds and orders that any of them made, while an admin restocks, all
at once against ``keel serve inventory --workers 3`` for a few seconds. Only the database can
order what the processes do. Afterwards, once the sweeper has returned the expired holds, the
verdict is read from the database: the invariant on every item, its counts equal to its holds and
orders, each buyer's holding equal to what they hold and bought, every answered order stored, and
one event per order placed, order cancelled and hold expired.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from keel.core.database import Database, create_engine
from keel.core.migrate import upgrade
from keel.core.outbox.tables import events as outbox
from keel.inventory.registration import MIGRATIONS
from keel.inventory.tables import holdings, items, orders, reservations
from tests.support.ledger import create_key
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.slow

WORKERS = 3
SHOPPERS = 24
RUN_SECONDS = 4.0
USERS = [f"u{i}" for i in range(6)]
# (stock, max_per_user): a roomy item, and limited ones that sell out and bite.
ITEMS = [(12, None), (10, 3), (4, 2), (8, 5)]
TTLS = [1, 1, 2, 900]  # most holds expire during the run; some outlive it
# What each operation may answer besides success, under any interleaving.
ALLOWED = {
    "purchase": {201: None, 409: {"sold_out", "limit_exceeded", "idempotency_key_in_use"}},
    "reserve": {201: None, 409: {"sold_out", "limit_exceeded"}},
    "confirm": {201: None, 409: {"reservation_expired", "reservation_released",
                                 "reservation_confirmed"}},
    "release": {204: None, 409: {"reservation_expired", "reservation_confirmed"}},
    "cancel": {200: None, 409: {"already_cancelled"}},
    "restock": {200: None},
    "read": {200: None},
}  # fmt: skip


@dataclass
class Run:
    """What the shoppers were told, shared by all of them."""

    item_ids: list[int]
    holds: list[int] = field(default_factory=list)
    orders: list[int] = field(default_factory=list)
    restocked: Counter[int] = field(default_factory=Counter)
    cancelled: list[int] = field(default_factory=list)
    confirmed: dict[int, int] = field(default_factory=dict)  # hold -> order
    answers: Counter[tuple[str, int, str | None]] = field(default_factory=Counter)

    def record(self, op: str, reply: httpx.Response) -> dict[str, Any] | None:
        body = reply.json() if reply.content else None
        code = body.get("code") if reply.status_code >= 400 and body else None
        self.answers[op, reply.status_code, code] += 1
        allowed = ALLOWED[op]
        assert reply.status_code in allowed, (op, reply.status_code, reply.text)
        codes = allowed[reply.status_code]
        assert codes is None or code in codes, (op, reply.status_code, reply.text)
        return body if reply.status_code < 300 else None


@pytest.fixture
def inventory_server(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[LiveServer, str]]:
    if backend == "postgres":
        url: str = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'inventory.db'}"
        asyncio.run(upgrade(url, [MIGRATIONS]))
    workdir = tmp_path / "server"
    workdir.mkdir()
    with LiveServer(url, workdir, workers=WORKERS, service="inventory") as server:
        yield server, url


@pytest.fixture
async def store(inventory_server: tuple[LiveServer, str]) -> AsyncIterator[Database]:
    database = Database(create_engine(inventory_server[1]))
    yield database
    await database.dispose()


async def shopper(client: httpx.AsyncClient, run: Run, seed: int, until: float) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        item, user = rng.choice(run.item_ids), rng.choice(USERS)
        roll = rng.random()
        if roll < 0.30:
            body = {"item_id": item, "user_id": user, "quantity": rng.randint(1, 3)}
            if rng.random() < 0.2:  # a retry racing its first try: one purchase at most
                key = {"Idempotency-Key": uuid.uuid4().hex}
                replies = await asyncio.gather(
                    *(client.post("/purchase", json=body, headers=key) for _ in range(2))
                )
            else:
                replies = [await client.post("/purchase", json=body)]
            for reply in replies:
                if bought := run.record("purchase", reply):
                    run.orders.append(bought["order_id"])
        elif roll < 0.50:
            body = {"item_id": item, "user_id": user, "quantity": rng.randint(1, 2),
                    "ttl_seconds": rng.choice(TTLS)}  # fmt: skip
            if held := run.record("reserve", await client.post("/reservations", json=body)):
                run.holds.append(held["reservation_id"])
        elif roll < 0.65 and run.holds:
            hold = rng.choice(run.holds)
            if order := run.record("confirm", await client.post(f"/reservations/{hold}/confirm")):
                run.confirmed[hold] = order["order_id"]
                run.orders.append(order["order_id"])
        elif roll < 0.75 and run.holds:
            run.record("release", await client.delete(f"/reservations/{rng.choice(run.holds)}"))
        elif roll < 0.85 and run.orders:
            order_id = rng.choice(run.orders)
            if run.record("cancel", await client.post(f"/orders/{order_id}/cancel")):
                run.cancelled.append(order_id)
        elif roll < 0.88:
            quantity = rng.randint(1, 3)
            reply = await client.post(f"/items/{item}/restock", json={"quantity": quantity})
            if run.record("restock", reply):
                run.restocked[item] += quantity
        else:
            seen = run.record("read", await client.get(f"/items/{item}"))
            assert seen is not None
            assert seen["available"] + seen["reserved"] + seen["sold"] == (
                seen["initial"] + seen["restocked"]
            )


@dataclass
class Stored:
    items: dict[int, Any]
    holds: dict[int, Any]
    orders: dict[int, Any]
    holdings: dict[tuple[int, str], int]
    events: Counter[tuple[str, int]]  # (event type, order or hold id)
    now: datetime


async def read_stored(database: Database, item_ids: list[int]) -> Stored:
    """The run's items and everything that refers to them, in one snapshot."""
    async with database.read() as conn:

        async def rows(table: Any, column: Any) -> list[Any]:
            return list(await conn.execute(select(table).where(column.in_(item_ids))))

        events: Counter[tuple[str, int]] = Counter()
        found = await conn.execute(
            select(outbox.c.event_type, outbox.c.payload).where(outbox.c.service == "inventory")
        )
        for kind, payload in found:
            data = json.loads(payload)
            if data.get("item_id") in item_ids and kind != "item.sold_out":
                events[kind, data.get("order_id") or data["reservation_id"]] += 1
        return Stored(
            items={r.id: r for r in await rows(items, items.c.id)},
            holds={r.id: r for r in await rows(reservations, reservations.c.item_id)},
            orders={r.id: r for r in await rows(orders, orders.c.item_id)},
            holdings={
                (r.item_id, r.user_id): r.quantity
                for r in await rows(holdings, holdings.c.item_id)
            },
            events=events,
            now=datetime.now(UTC),
        )  # fmt: skip


async def swept(database: Database, item_ids: list[int], timeout: float = 20.0) -> Stored:
    """The stored state once no hold is past its time (the sweeper has been by)."""
    deadline = time.monotonic() + timeout
    while True:
        stored = await read_stored(database, item_ids)
        if all(h.state != "held" or h.expires_at > stored.now for h in stored.holds.values()):
            return stored
        assert time.monotonic() < deadline, "the sweeper left expired holds"
        await asyncio.sleep(0.1)


def check_counts(stored: Stored, run: Run, supply: dict[int, int]) -> None:
    limits = dict(zip(run.item_ids, (limit for _, limit in ITEMS), strict=True))
    owned: Counter[tuple[int, str]] = Counter()
    for item_id, row in stored.items.items():
        assert row.available + row.reserved + row.sold == row.initial + row.restocked
        assert min(row.available, row.reserved, row.sold) >= 0
        assert row.initial + row.restocked == supply[item_id] + run.restocked[item_id]
        held = [h for h in stored.holds.values() if h.item_id == item_id and h.state == "held"]
        placed = [o for o in stored.orders.values() if o.item_id == item_id and o.state == "placed"]
        assert row.reserved == sum(h.quantity for h in held)  # every one of them unexpired
        assert row.sold == sum(o.quantity for o in placed)
        for hold_or_order in (*held, *placed):
            owned[item_id, hold_or_order.user_id] += hold_or_order.quantity
    for (item_id, user), quantity in stored.holdings.items():
        assert limits[item_id] is not None, "holdings are kept only for limited items"
        assert quantity == owned[item_id, user] <= limits[item_id]
    for (item_id, user), quantity in owned.items():
        if limits[item_id] is not None:
            assert stored.holdings.get((item_id, user), 0) == quantity


def check_answers_are_stored(stored: Stored, run: Run) -> None:
    assert set(stored.orders) == set(run.orders), "every order stored was answered 201, and back"
    assert len(run.cancelled) == len(set(run.cancelled)), "an order was cancelled twice"
    assert {o.id for o in stored.orders.values() if o.state == "cancelled"} == set(run.cancelled)
    assert set(stored.holds) == set(run.holds)
    for hold_id, order_id in run.confirmed.items():
        assert (stored.holds[hold_id].state, stored.holds[hold_id].order_id) == (
            "confirmed",
            order_id,
        )
        assert stored.orders[order_id].reservation_id == hold_id
    assert {h.id for h in stored.holds.values() if h.state == "confirmed"} == set(run.confirmed)
    # One event per change, written in its transaction.
    expected = Counter(
        [("order.placed", o) for o in stored.orders]
        + [("order.cancelled", o) for o in run.cancelled]
        + [("reservation.expired", h.id) for h in stored.holds.values() if h.state == "expired"]
    )
    assert stored.events == expected  # fmt: skip


async def test_mixed_operations_at_once_keep_every_count_true(
    inventory_server: tuple[LiveServer, str], store: Database
) -> None:
    server, url = inventory_server
    key = await create_key(url)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {key}"},
        limits=limits,
        timeout=httpx.Timeout(60.0),
    ) as client:
        supply, item_ids = {}, []
        for stock, limit in ITEMS:
            body = {"sku": f"mix-{uuid.uuid4().hex[:12]}", "name": "Mixed", "stock": stock}
            reply = await client.post("/items", json={**body, "max_per_user": limit})
            assert reply.status_code == 201, reply.text
            item_ids.append(reply.json()["id"])
            supply[reply.json()["id"]] = stock
        run = Run(item_ids)
        before = {route: server.requests_served("POST", route) for route in ("/purchase",)}
        until = time.monotonic() + RUN_SECONDS
        await asyncio.gather(*(shopper(client, run, seed, until) for seed in range(SHOPPERS)))

    # Everything that can race did, in more than one process.
    for op in ("purchase", "reserve", "confirm", "release", "cancel"):
        assert any(a[0] == op and a[1] < 300 for a in run.answers), (op, run.answers)
    assert any(a[2] == "sold_out" for a in run.answers), run.answers
    bought = sum(n for (op, status, _), n in run.answers.items() if op == "purchase")
    served = server.wait_requests_served("POST", "/purchase", before["/purchase"], bought)
    assert len(served) >= 2, served

    stored = await swept(store, item_ids)
    assert any(h.state == "expired" for h in stored.holds.values()), "no hold expired"
    check_counts(stored, run, supply)
    check_answers_are_stored(stored, run)
