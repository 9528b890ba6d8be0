"""Purchases by group commit: many buyers per transaction, each granted only while stock lasts.

A thousand buyers of one item would otherwise queue on its row, each transaction waiting for the
previous commit. Here one committer task per process gathers the purchases that arrived during
the previous commit and applies them in one transaction:

1. claim the batch's idempotency keys (a retried purchase replays its first answer);
2. stock, per item in id order: first one conditional ``UPDATE … SET available = available - :total
   WHERE available >= :total`` for every purchase of the item at once; if the stock cannot cover
   them all, one conditional UPDATE per purchase, in arrival order, so each is granted exactly
   while stock lasts and the rest are refused ``sold_out``;
3. per-user limits (items with ``max_per_user``): purchase by purchase in arrival order, the
   stock as above, then one conditional upsert of the buyer's holding, ``… SET quantity =
   quantity + :q WHERE quantity + :q <= max_per_user``; a refused one gives its stock back
   (``limit_exceeded``), so only granted purchases count against later ones;
4. the orders, their ``order.placed`` events (and ``item.sold_out`` when the last unit went) and
   the idempotency records, set-wise; then commit, then answer.

Every transaction locks an item's stock row before any holding row of it, and items in id
order, so no two transactions, in any process, wait on each other in a cycle.
No stock is read and then written: every decision is a conditional statement the database
applies atomically (on SQLite, under ``BEGIN IMMEDIATE``; on PostgreSQL, under the row lock the
UPDATE takes), so any number of processes and hosts can run this at once.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from keel.core.batching import GroupCommitter
from keel.core.database import Database
from keel.core.errors import KeelError
from keel.core.idempotency import (
    IdempotencyStore,
    IdempotentRequest,
    StoredResponse,
    pg_record_args,
)
from keel.core.statements import BulkStatement, allocate_ids
from keel.inventory import pg_purchases, stock
from keel.inventory.errors import ItemNotFound, LimitExceeded, SoldOut
from keel.inventory.schemas import Order
from keel.inventory.tables import OUTBOX, items, orders

_INSERT_ORDERS = BulkStatement(
    insert(orders),
    ["id", "item_id", "user_id", "quantity", "state", "reservation_id", "created_at"],
)


@dataclass(eq=False)
class Purchase:
    item_id: int
    user_id: str
    quantity: int
    idempotency: IdempotentRequest | None = None
    result: Order | StoredResponse | KeelError | None = field(default=None, init=False)
    claimed: bool = field(default=False, init=False)
    limit: int | None = field(default=None, init=False)
    remaining: int = field(default=0, init=False)

    @property
    def pending(self) -> bool:
        return self.result is None


PurchaseOutcome = Order | StoredResponse | KeelError


def purchase_committer(
    database: Database, store: IdempotencyStore, max_batch: int
) -> GroupCommitter[Purchase, Order | StoredResponse]:
    def apply(conn: Connection, batch: list[Purchase]) -> list[PurchaseOutcome]:
        for purchase in batch:  # a batch rolled back by a deadlock runs again from the start
            purchase.result, purchase.claimed, purchase.limit = None, False, None
        apply_batch(conn, store, batch)
        return [_outcome(p) for p in batch]

    return GroupCommitter(
        name="inventory_purchases", database=database, apply=apply, max_batch=max_batch
    )


def _outcome(purchase: Purchase) -> PurchaseOutcome:
    assert purchase.result is not None, "every purchase of a batch is settled"
    return purchase.result


def apply_batch(conn: Connection, store: IdempotencyStore, batch: list[Purchase]) -> None:
    """Apply a batch inside the caller's write transaction; see the module docstring."""
    _claim_keys(conn, store, batch)
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        sold_out, reserved_ids = _take_on_postgres(conn, batch)
    else:
        _check_items(conn, batch)
        sold_out = _take_stock(conn, batch)
    granted = [p for p in batch if p.pending]
    now = datetime.now(UTC)
    ids = reserved_ids[: len(granted)] if postgres else allocate_ids(conn, orders, len(granted))
    placed = []
    for purchase, order_id in zip(granted, ids, strict=True):
        purchase.result = Order(
            order_id=order_id,
            item_id=purchase.item_id,
            user_id=purchase.user_id,
            quantity=purchase.quantity,
            state="placed",
            remaining=purchase.remaining,
            created_at=now,
        )
        placed.append(purchase.result)
    completed = [
        (p.idempotency, 201, p.result.model_dump_json())
        for p in granted
        if p.idempotency is not None and isinstance(p.result, Order)
    ]
    released = [
        p.idempotency
        for p in batch
        if p.claimed and p.idempotency is not None and isinstance(p.result, KeelError)
    ]
    events = OUTBOX.rows("order.placed", [o.model_dump_json() for o in placed], now)
    if sold_out:
        events += OUTBOX.rows("item.sold_out", stock.sold_out_payloads(sold_out, now), now)
    if postgres:
        pg_purchases.write_all(
            conn,
            orders=[(o.order_id, o.item_id, o.user_id, o.quantity) for o in placed],
            created_at=now,
            service=OUTBOX.service,
            events=[(e["event_type"], e["event_id"], e["payload"]) for e in events],
            keys=pg_record_args(completed, released),
        )
        return
    _INSERT_ORDERS.execute(
        conn,
        [
            {
                "id": o.order_id,
                "item_id": o.item_id,
                "user_id": o.user_id,
                "quantity": o.quantity,
                "state": "placed",
                "reservation_id": None,
                "created_at": now,
            }
            for o in placed
        ],
    )
    OUTBOX.insert_rows(conn, events)
    store.complete_many(conn, completed)
    store.release_many(conn, released)


def _take_on_postgres(conn: Connection, batch: list[Purchase]) -> tuple[list[int], list[int]]:
    """Each item's total in one statement where it can be had whole; the rest one by one.

    Returns the items this batch sold out and the order ids reserved for it.
    """
    pending = [p for p in batch if p.pending]
    if not pending:
        return [], []
    taken = pg_purchases.take_all(conn, [(p.item_id, p.quantity) for p in pending], len(pending))
    whole: dict[int, list[Purchase]] = defaultdict(list)
    rest = []
    for purchase in pending:
        if purchase.item_id not in taken.existing:
            purchase.result = ItemNotFound(f"No item with id {purchase.item_id}.")
        elif purchase.item_id in taken.left:
            whole[purchase.item_id].append(purchase)
        else:
            rest.append(purchase)  # nearly sold out, or limited per user
    sold_out = []
    for item_id, wanted in whole.items():
        left = taken.left[item_id]
        if left == 0:
            sold_out.append(item_id)
        for purchase in reversed(wanted):  # each sees what was left right after it
            purchase.remaining = left
            left += purchase.quantity
    if rest:
        _check_items(conn, rest)
        sold_out += _take_stock(conn, rest)
    return sold_out, taken.order_ids


def _claim_keys(conn: Connection, store: IdempotencyStore, batch: list[Purchase]) -> None:
    keyed = [p for p in batch if p.idempotency is not None]
    if not keyed:
        return
    claims = store.claim_many(conn, [p.idempotency for p in keyed if p.idempotency is not None])
    for purchase, claim in zip(keyed, claims, strict=True):
        if claim is None:
            purchase.claimed = True
        else:
            purchase.result = claim  # the first answer to replay, or a refusal


def _check_items(conn: Connection, batch: list[Purchase]) -> None:
    """Unknown items are refused; each purchase learns its item's per-user limit (immutable)."""
    wanted = sorted({p.item_id for p in batch if p.pending})
    if not wanted:
        return
    limits = dict(
        conn.execute(select(items.c.id, items.c.max_per_user).where(items.c.id.in_(wanted))).all()
    )
    for purchase in batch:
        if not purchase.pending:
            continue
        if purchase.item_id not in limits:
            purchase.result = ItemNotFound(f"No item with id {purchase.item_id}.")
        else:
            purchase.limit = limits[purchase.item_id]


def _take_stock(conn: Connection, batch: list[Purchase]) -> list[int]:
    """Grant each pending purchase while stock lasts; returns the items this batch sold out.

    Items in id order, and on each item its stock row before any per-user holding row: one
    lock order for every transaction of every process, so no two can wait on each other.
    """
    by_item: dict[int, list[Purchase]] = defaultdict(list)
    for purchase in batch:
        if purchase.pending:
            by_item[purchase.item_id].append(purchase)
    sold_out = []
    for item_id in sorted(by_item):
        wanted = by_item[item_id]
        if wanted[0].limit is None:
            left = _take_item(conn, item_id, wanted)
        else:
            left = _take_limited(conn, item_id, wanted, wanted[0].limit)
        if left == 0:
            sold_out.append(item_id)
    return sold_out


def _take_item(conn: Connection, item_id: int, wanted: list[Purchase]) -> int | None:
    """All of them in one statement if the stock covers them, else one by one in arrival order.

    Returns what is left after the batch, or None if nothing was granted.
    """
    left = stock.take(conn, item_id, sum(p.quantity for p in wanted))
    if left is not None:
        for purchase in reversed(wanted):  # each sees what was left right after it
            purchase.remaining = left
            left += purchase.quantity
        return wanted[-1].remaining
    last = None
    for purchase in wanted:
        left = stock.take(conn, item_id, purchase.quantity)
        if left is None:
            purchase.result = SoldOut(f"Item {item_id} has fewer than {purchase.quantity} left.")
        else:
            purchase.remaining = last = left
    return last


def _take_limited(conn: Connection, item_id: int, wanted: list[Purchase], limit: int) -> int | None:
    """One by one in arrival order: the stock, then the buyer's holding (given back if refused).

    Only a granted purchase counts against a later one of the same buyer.
    """
    last = None
    for purchase in wanted:
        left = stock.take(conn, item_id, purchase.quantity)
        if left is None:
            purchase.result = SoldOut(f"Item {item_id} has fewer than {purchase.quantity} left.")
        elif stock.add_holding(conn, item_id, purchase.user_id, purchase.quantity, limit):
            purchase.remaining = last = left
        else:
            stock.give_back(conn, item_id, purchase.quantity, source="sold")
            purchase.result = LimitExceeded(
                f"User {purchase.user_id} may hold at most {limit} of item {item_id}."
            )
            last = left + purchase.quantity
    return last
