"""The inventory against a model: any interleaving of its operations leaves the database where a
few lines of Python say it must be.

Hypothesis drives items, restocks, purchases (in group-commit batches, with per-user limits),
holds, confirms, releases, the passing of time, expiry sweeps and cancels through the service
functions and the purchase batch, each in its own write transaction on a real database (SQLite
and PostgreSQL). After every step the stored items, holds, orders and per-user holdings must
equal the model's, and every item must satisfy the invariant.

Time is a clock the test moves: the service reads it through ``service._now``, so a hold expires
exactly when the model says, and the sweep runs when the test calls ``expire_due``, not when a
background task happens to. Nothing else is replaced: the statements run on the database.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select
from sqlalchemy.engine import Connection

from keel.core.database import Database, create_engine
from keel.core.errors import KeelError
from keel.core.idempotency import IdempotencyStore
from keel.inventory import service
from keel.inventory.purchases import Purchase, apply_batch
from keel.inventory.schemas import MAX_STOCK, ItemCreate, Order, ReservationCreate
from keel.inventory.tables import holdings, items, orders, reservations

T = TypeVar("T")
EXAMPLES = int(os.environ.get("KEEL_TEST_MODEL_EXAMPLES", "25"))
STEPS = int(os.environ.get("KEEL_TEST_MODEL_STEPS", "40"))
MAX_HOLD = 900
UNKNOWN = 2**62  # an id no test reaches
USERS = st.sampled_from(["ann", "bob", "7"])
QUANTITIES = st.integers(1, 3)


@dataclass
class ItemRow:
    available: int
    initial: int
    max_per_user: int | None
    reserved: int = 0
    sold: int = 0
    restocked: int = 0


@dataclass
class HoldRow:
    item_id: int
    user_id: str
    quantity: int
    expires_at: datetime
    state: str = "held"  # as stored: a hold past its time stays `held` until swept
    order_id: int | None = None


@dataclass
class OrderRow:
    item_id: int
    user_id: str
    quantity: int
    reservation_id: int | None
    state: str = "placed"


class Clock:
    """The service's clock: it moves only when the test says."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


class Shop:
    """What the inventory must hold: the model, moved by the same rules in plain Python."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.items: dict[int, ItemRow] = {}
        self.holds: dict[int, HoldRow] = {}
        self.orders: dict[int, OrderRow] = {}

    def seen(self, hold: HoldRow) -> str:
        """A hold's state as a reader sees it: past its time it is expired, swept or not."""
        due = hold.state == "held" and hold.expires_at <= self.clock.now
        return "expired" if due else hold.state

    def holding(self, item_id: int, user_id: str) -> int:
        """Units the user holds or bought of the item: what ``max_per_user`` bounds."""
        held = sum(
            h.quantity
            for h in self.holds.values()
            if (h.item_id, h.user_id, h.state) == (item_id, user_id, "held")
        )
        bought = sum(
            o.quantity
            for o in self.orders.values()
            if (o.item_id, o.user_id, o.state) == (item_id, user_id, "placed")
        )
        return held + bought

    def refusal(self, item_id: int, user_id: str, quantity: int) -> str | None:
        """Why a purchase or hold of ``quantity`` is refused now, checked in the service's order."""
        item = self.items.get(item_id)
        if item is None:
            return "item_not_found"
        if item.available < quantity:  # the stock row first, then the holding (one lock order)
            return "sold_out"
        limit = item.max_per_user
        if limit is not None and self.holding(item_id, user_id) + quantity > limit:
            return "limit_exceeded"
        return None


def _snapshot(conn: Connection, shop: Shop) -> dict[str, Any]:
    """The rows of the model's items, read in one transaction."""
    ids = list(shop.items)
    return {
        "items": {r.id: r for r in conn.execute(select(items).where(items.c.id.in_(ids)))},
        "holds": {
            r.id: r
            for r in conn.execute(select(reservations).where(reservations.c.item_id.in_(ids)))
        },
        "orders": {r.id: r for r in conn.execute(select(orders).where(orders.c.item_id.in_(ids)))},
        "holdings": {
            (r.item_id, r.user_id): r.quantity
            for r in conn.execute(select(holdings).where(holdings.c.item_id.in_(ids)))
            if r.quantity
        },
        "seen": {h: service.get_reservation(conn, h).state for h in shop.holds},
    }


class InventoryMachine(RuleBasedStateMachine):
    """Steps on the database and on the model; after each, the two must agree."""

    database: Database
    runner: asyncio.Runner
    clock: Clock

    def __init__(self) -> None:
        super().__init__()
        self.shop = Shop(self.clock)
        self.prefix = uuid.uuid4().hex[:10]
        self.store = IdempotencyStore(timedelta(days=1))

    def write(self, work: Callable[[Connection], T]) -> T | KeelError:
        """Run ``work`` in one write transaction; a refusal is returned (and rolled back)."""
        try:
            return self.runner.run(self.database.run_write(work))
        except KeelError as refusal:
            return refusal

    def expect(self, outcome: object, refusal: str | None) -> None:
        if refusal is None:
            assert not isinstance(outcome, KeelError), outcome.code
        else:
            assert isinstance(outcome, KeelError), f"expected {refusal}, got {outcome!r}"
            assert outcome.code == refusal

    # -- items ------------------------------------------------------------------------------------

    @rule(stock=st.integers(0, 6) | st.just(MAX_STOCK), limit=st.none() | st.integers(1, 3))
    def create_item(self, stock: int, limit: int | None) -> None:
        sku = f"m-{self.prefix}-{len(self.shop.items)}"
        body = ItemCreate(sku=sku, name="Model widget", stock=stock, max_per_user=limit)
        item = self.write(lambda conn: service.create_item(conn, body))
        assert not isinstance(item, KeelError), item
        self.shop.items[item.id] = ItemRow(available=stock, initial=stock, max_per_user=limit)

    @precondition(lambda self: self.shop.items)
    @rule()
    def create_item_with_a_taken_sku(self) -> None:
        body = ItemCreate(sku=f"m-{self.prefix}-0", name="Twin", stock=1)
        self.expect(self.write(lambda conn: service.create_item(conn, body)), "sku_taken")

    @rule(data=st.data(), quantity=st.sampled_from([1, 2, 5, MAX_STOCK]))
    def restock(self, data: st.DataObject, quantity: int) -> None:
        item_id = data.draw(st.sampled_from([*self.shop.items, UNKNOWN]), label="item")
        outcome = self.write(lambda conn: service.restock(conn, item_id, quantity))
        item = self.shop.items.get(item_id)
        if item is None:
            return self.expect(outcome, "item_not_found")
        if item.initial + item.restocked + quantity > MAX_STOCK:
            return self.expect(outcome, "stock_out_of_range")
        self.expect(outcome, None)
        item.available += quantity
        item.restocked += quantity

    # -- purchases --------------------------------------------------------------------------------

    @rule(data=st.data())
    def purchase_batch(self, data: st.DataObject) -> None:
        """Concurrent buyers as one group commit: the same answers as one after another."""
        wanted = data.draw(
            st.lists(
                st.tuples(st.sampled_from([*self.shop.items, UNKNOWN]), USERS, QUANTITIES),
                min_size=1,
                max_size=5,
            ),
            label="purchases",
        )

        def buy(conn: Connection) -> list[Any]:
            batch = [Purchase(item_id, user, quantity) for item_id, user, quantity in wanted]
            apply_batch(conn, self.store, batch)
            return [p.result for p in batch]

        results = self.write(buy)
        assert isinstance(results, list), results
        for (item_id, user, quantity), result in zip(wanted, results, strict=True):
            refusal = self.shop.refusal(item_id, user, quantity)
            self.expect(result, refusal)
            if refusal is None:
                assert isinstance(result, Order)
                item = self.shop.items[item_id]
                item.available -= quantity
                item.sold += quantity
                assert result.remaining == item.available
                self.shop.orders[result.order_id] = OrderRow(item_id, user, quantity, None)

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        order_id = data.draw(st.sampled_from([*self.shop.orders, UNKNOWN]), label="order")
        outcome = self.write(lambda conn: service.cancel(conn, order_id))
        order = self.shop.orders.get(order_id)
        if order is None:
            return self.expect(outcome, "order_not_found")
        if order.state == "cancelled":
            return self.expect(outcome, "already_cancelled")
        self.expect(outcome, None)
        order.state = "cancelled"
        item = self.shop.items[order.item_id]
        item.sold -= order.quantity
        item.available += order.quantity

    # -- holds ------------------------------------------------------------------------------------

    @rule(data=st.data(), user=USERS, quantity=QUANTITIES, ttl=st.integers(1, MAX_HOLD))
    def reserve(self, data: st.DataObject, user: str, quantity: int, ttl: int) -> None:
        item_id = data.draw(st.sampled_from([*self.shop.items, UNKNOWN]), label="item")
        body = ReservationCreate(item_id=item_id, user_id=user, quantity=quantity, ttl_seconds=ttl)
        outcome = self.write(lambda conn: service.reserve(conn, body, user, MAX_HOLD))
        refusal = self.shop.refusal(item_id, user, quantity)
        self.expect(outcome, refusal)
        if refusal is None:
            assert not isinstance(outcome, KeelError)
            item = self.shop.items[item_id]
            item.available -= quantity
            item.reserved += quantity
            expires_at = self.clock.now + timedelta(seconds=ttl)
            assert (outcome.state, outcome.expires_at) == ("held", expires_at)
            self.shop.holds[outcome.reservation_id] = HoldRow(item_id, user, quantity, expires_at)

    def _pick_hold(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from([*self.shop.holds, UNKNOWN]), label="hold")

    @rule(data=st.data())
    def confirm(self, data: st.DataObject) -> None:
        hold_id = self._pick_hold(data)
        outcome = self.write(lambda conn: service.confirm(conn, hold_id))
        hold = self.shop.holds.get(hold_id)
        if hold is None:
            return self.expect(outcome, "reservation_not_found")
        seen = self.shop.seen(hold)
        if seen != "held":
            return self.expect(outcome, f"reservation_{seen}")
        assert isinstance(outcome, Order), outcome
        hold.state, hold.order_id = "confirmed", outcome.order_id
        item = self.shop.items[hold.item_id]
        item.reserved -= hold.quantity
        item.sold += hold.quantity
        assert outcome.remaining == item.available
        self.shop.orders[outcome.order_id] = OrderRow(
            hold.item_id, hold.user_id, hold.quantity, hold_id
        )

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        hold_id = self._pick_hold(data)
        outcome = self.write(lambda conn: service.release(conn, hold_id))
        hold = self.shop.holds.get(hold_id)
        if hold is None:
            return self.expect(outcome, "reservation_not_found")
        seen = self.shop.seen(hold)
        if seen == "released":  # releasing again changes nothing
            return self.expect(outcome, None)
        if seen != "held":
            return self.expect(outcome, f"reservation_{seen}")
        self.expect(outcome, None)
        hold.state = "released"
        item = self.shop.items[hold.item_id]
        item.reserved -= hold.quantity
        item.available += hold.quantity

    @rule(seconds=st.sampled_from([1, 59, 60, 299, 300, 600, MAX_HOLD]))
    def time_passes(self, seconds: int) -> None:
        self.clock.now += timedelta(seconds=seconds)

    @rule()
    def sweep(self) -> None:
        """The sweeper's round: holds past their time give their stock back, each once."""
        expired = 0
        while True:  # the shared PostgreSQL database may hold other tests' stale holds too
            swept = self.write(service.expire_due)
            assert isinstance(swept, int)
            expired += swept
            if swept < service.SWEEP_ROWS:
                break
        due = [
            h for h in self.shop.holds.values() if h.state == "held" and self.shop.seen(h) != "held"
        ]
        assert expired >= len(due)
        for hold in due:
            hold.state = "expired"
            item = self.shop.items[hold.item_id]
            item.reserved -= hold.quantity
            item.available += hold.quantity

    # -- the check after every step ---------------------------------------------------------------

    @invariant()
    def database_matches_the_model(self) -> None:
        stored = self.runner.run(self.database.run_read(lambda c: _snapshot(c, self.shop)))
        for item_id, row in stored["items"].items():
            assert row.available + row.reserved + row.sold == row.initial + row.restocked
            assert min(row.available, row.reserved, row.sold) >= 0
            # What the counts say agrees with the holds and orders the database keeps.
            held = [h for h in stored["holds"].values() if h.item_id == item_id]
            placed = [o for o in stored["orders"].values() if o.item_id == item_id]
            assert row.reserved == sum(h.quantity for h in held if h.state == "held")
            assert row.sold == sum(o.quantity for o in placed if o.state == "placed")
        assert {
            i: (r.available, r.reserved, r.sold, r.initial, r.restocked, r.max_per_user)
            for i, r in stored["items"].items()
        } == {
            i: (m.available, m.reserved, m.sold, m.initial, m.restocked, m.max_per_user)
            for i, m in self.shop.items.items()
        }
        assert {
            i: (r.item_id, r.user_id, r.quantity, r.state, r.expires_at, r.order_id)
            for i, r in stored["holds"].items()
        } == {
            i: (m.item_id, m.user_id, m.quantity, m.state, m.expires_at, m.order_id)
            for i, m in self.shop.holds.items()
        }
        assert stored["seen"] == {i: self.shop.seen(m) for i, m in self.shop.holds.items()}
        assert {
            i: (r.item_id, r.user_id, r.quantity, r.state, r.reservation_id)
            for i, r in stored["orders"].items()
        } == {
            i: (m.item_id, m.user_id, m.quantity, m.state, m.reservation_id)
            for i, m in self.shop.orders.items()
        }
        expected: dict[tuple[int, str], int] = defaultdict(int)
        for item_id, item in self.shop.items.items():
            if item.max_per_user is not None:
                for user in ("ann", "bob", "7"):
                    if held := self.shop.holding(item_id, user):
                        expected[item_id, user] = held
                        assert held <= item.max_per_user
        assert stored["holdings"] == expected


@pytest.fixture
def model_database(database_url: str) -> Iterator[tuple[asyncio.Runner, Database]]:
    """The test's database on a loop of its own: the state machine's steps are synchronous."""
    with asyncio.Runner() as runner:
        database = Database(create_engine(database_url))
        yield runner, database
        runner.run(database.dispose())


def test_any_interleaving_matches_the_model(
    model_database: tuple[asyncio.Runner, Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(service, "_now", clock)
    runner, database = model_database

    class Machine(InventoryMachine):
        pass

    Machine.runner, Machine.database, Machine.clock = runner, database, clock
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


async def test_a_sold_out_purchase_does_not_count_against_the_buyers_next(
    database: Database,
) -> None:
    """What the model found: two purchases of one unit by one buyer (limit 1) of a sold-out item,
    in one batch. The second was told ``limit_exceeded`` (the first had counted against the
    limit before the stock ran out): no order of the two gives that answer. Both are sold out."""
    sku = f"m-{uuid.uuid4().hex[:10]}"
    body = ItemCreate(sku=sku, name="Gone", stock=0, max_per_user=1)
    item = await database.run_write(lambda conn: service.create_item(conn, body))
    batch = [Purchase(item.id, "ann", 1), Purchase(item.id, "ann", 1)]
    store = IdempotencyStore(timedelta(days=1))
    await database.run_write(lambda conn: apply_batch(conn, store, batch))
    assert [getattr(p.result, "code", None) for p in batch] == ["sold_out", "sold_out"]
