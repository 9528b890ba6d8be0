"""The conditional statements every stock movement is made of, shared by all the routes.

None reads a count and writes it back: each is one statement the database applies atomically,
and those that can be refused return what it decided. The invariant
``available + reserved + sold = initial + restocked`` (all ≥ 0) is also a CHECK constraint on
``inventory_items``, so a statement that would break it fails instead of committing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from keel.inventory.tables import OUTBOX, holdings, items


def take(conn: Connection, item_id: int, quantity: int, *, hold: bool = False) -> int | None:
    """Move ``quantity`` out of ``available`` (to ``sold``, or ``reserved`` if ``hold``).

    Returns what is left available, or None if there was not enough (nothing changed).
    """
    target = items.c.reserved if hold else items.c.sold
    statement = (
        update(items)
        .where(items.c.id == item_id, items.c.available >= quantity)
        .values({items.c.available: items.c.available - quantity, target: target + quantity})
        .returning(items.c.available)
    )
    left = conn.execute(statement).scalar_one_or_none()
    return None if left is None else int(left)


def give_back(conn: Connection, item_id: int, quantity: int, *, source: str) -> None:
    """Return ``quantity`` to ``available`` from ``sold`` (a cancel) or ``reserved`` (a release).

    The CHECK constraints refuse a source that does not hold that much: that would be a bug,
    and it fails the transaction rather than inventing stock.
    """
    column = items.c[source]
    conn.execute(
        update(items)
        .where(items.c.id == item_id)
        .values({items.c.available: items.c.available + quantity, column: column - quantity})
    )


def settle_hold(conn: Connection, item_id: int, quantity: int) -> int:
    """A confirmed hold: ``reserved`` to ``sold``; returns what is available."""
    statement = (
        update(items)
        .where(items.c.id == item_id)
        .values(reserved=items.c.reserved - quantity, sold=items.c.sold + quantity)
        .returning(items.c.available)
    )
    return int(conn.execute(statement).scalar_one())


def add_holding(conn: Connection, item_id: int, user_id: str, quantity: int, limit: int) -> bool:
    """Count ``quantity`` more against the user's limit on the item, if it stays within it."""
    if quantity > limit:
        return False
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    upsert = insert(holdings).values(item_id=item_id, user_id=user_id, quantity=quantity)
    statement = upsert.on_conflict_do_update(
        index_elements=[holdings.c.item_id, holdings.c.user_id],
        set_={"quantity": holdings.c.quantity + quantity},
        where=holdings.c.quantity + quantity <= limit,
    ).returning(holdings.c.quantity)
    return conn.execute(statement).first() is not None


def drop_holding(conn: Connection, item_id: int, user_id: str, quantity: int) -> None:
    """Stop counting ``quantity`` against the user (a refused, released or cancelled unit)."""
    conn.execute(
        update(holdings)
        .where(holdings.c.item_id == item_id, holdings.c.user_id == user_id)
        .values(quantity=holdings.c.quantity - quantity)
    )


def drop_holdings(conn: Connection, held: dict[tuple[int, str], int]) -> None:
    """:func:`drop_holding` for many (item, user) pairs, in key order, in one executemany."""
    if held:
        conn.execute(
            update(holdings)
            .where(
                holdings.c.item_id == bindparam("h_item"),
                holdings.c.user_id == bindparam("h_user"),
            )
            .values(quantity=holdings.c.quantity - bindparam("h_quantity")),
            [
                {"h_item": item, "h_user": user, "h_quantity": quantity}
                for (item, user), quantity in sorted(held.items())
            ],
        )


def limit_of(conn: Connection, item_id: int) -> tuple[bool, int | None]:
    """(whether the item exists, its per-user limit)."""
    row = conn.execute(select(items.c.max_per_user).where(items.c.id == item_id)).first()
    return (row is not None, None if row is None else row[0])


def sold_out_payloads(item_ids: Sequence[int], now: datetime) -> list[str]:
    return [json.dumps({"item_id": item_id, "at": now.isoformat()}) for item_id in item_ids]


def publish_sold_out(conn: Connection, item_ids: Sequence[int], now: datetime) -> None:
    if item_ids:
        OUTBOX.publish_many(conn, "item.sold_out", sold_out_payloads(item_ids, now), created_at=now)
