"""Purchases by group commit: many buyers per transaction, each granted only while stock lasts.

A thousand buyers of one item would otherwise queue on its row, each transaction waiting for the
previous commit. Here one committer task per process gathers the purchases that arrived during
the previous commit and applies them in one transaction:

1. claim the batch's idempotency keys (a retried purchase replays its first answer);
2. per-user limits: one conditional upsert per limited purchase, ``… SET quantity = quantity + :q
   WHERE quantity + :q <= max_per_user``;
3. stock, per item in id order: first one conditional ``UPDATE … SET available = available - :total
   WHERE available >= :total`` for every purchase of the item at once; if the stock cannot cover
   them all, one conditional UPDATE per purchase, in arrival order, so each is granted exactly
   while stock lasts and the rest are refused ``sold_out``;
4. the orders, their ``order.placed`` events (and ``item.sold_out`` when the last unit went) and
   the idempotency records, set-wise; then commit, then answer.

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
        _reserve_limits(conn, batch)
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
        _reserve_limits(conn, rest)
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


def _reserve_limits(conn: Connection, batch: list[Purchase]) -> None:
    for p in batch:
        if p.pending and p.limit is not None:
            if stock.add_holding(conn, p.item_id, p.user_id, p.quantity, p.limit):
                continue
            p.result = LimitExceeded(
                f"User {p.user_id} may hold at most {p.limit} of item {p.item_id}."
            )


def _take_stock(conn: Connection, batch: list[Purchase]) -> list[int]:
    """Grant each pending purchase while stock lasts; returns the items this batch sold out."""
    by_item: dict[int, list[Purchase]] = defaultdict(list)
    for purchase in batch:
        if purchase.pending:
            by_item[purchase.item_id].append(purchase)
    sold_out = []
    for item_id in sorted(by_item):  # one lock order for every process: no deadlock cycles
        wanted = by_item[item_id]
        left = stock.take(conn, item_id, sum(p.quantity for p in wanted))
        if left is not None:
            for purchase in reversed(wanted):  # each sees what was left right after it
                purchase.remaining = left
                left += purchase.quantity
            left = wanted[-1].remaining
        else:
            for purchase in wanted:
                left = stock.take(conn, item_id, purchase.quantity)
                if left is None:
                    purchase.result = SoldOut(
                        f"Item {item_id} has fewer than {purchase.quantity} left."
                    )
                    if purchase.limit is not None:
                        stock.drop_holding(conn, item_id, purchase.user_id, purchase.quantity)
                else:
                    purchase.remaining = left
            granted = [p for p in wanted if p.pending]
            left = granted[-1].remaining if granted else None
        if left == 0:
            sold_out.append(item_id)
    return sold_out
