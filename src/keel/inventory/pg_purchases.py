"""A purchase batch on PostgreSQL: two statements for the common case, ``BEGIN`` and ``COMMIT``.

SQLAlchemy's execution path and each round trip cost more than the statements themselves, and a
hot item's row stays locked from its UPDATE to the COMMIT; so the batch (see
:mod:`keel.inventory.purchases`) runs:

1. :func:`take_all`: one conditional ``UPDATE … FROM unnest`` takes each item's total for the
   batch where the stock covers it and the item has no per-user limit, and the same statement
   reserves the order ids and says which items exist (a batch over several items locks them
   in id order first);
2. :func:`write_all`: the orders, their outbox events and the idempotency records in one
   statement of data-modifying CTEs fed by ``unnest`` arrays.

Items it could not take whole (nearly sold out, or limited per user) go through the general
per-purchase statements in between. Values are always bound parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy.engine import Connection
from sqlalchemy.util import await_only

from keel.core.idempotency import pg_record_ctes

_TAKE = """
WITH wanted AS (
    SELECT w.item_id, sum(w.quantity) AS total
    FROM unnest($1::bigint[], $2::bigint[]) AS w(item_id, quantity)
    GROUP BY w.item_id
), taken AS (
    UPDATE inventory_items AS i
    SET available = i.available - w.total, sold = i.sold + w.total
    FROM wanted AS w
    WHERE i.id = w.item_id AND i.available >= w.total AND i.max_per_user IS NULL
    RETURNING i.id, i.available
)
SELECT
    array(SELECT id FROM taken),
    array(SELECT available FROM taken),
    array(SELECT id FROM inventory_items WHERE id = ANY($1::bigint[])),
    array(SELECT nextval(pg_get_serial_sequence('inventory_orders', 'id'))
          FROM generate_series(1, $3))
"""

_WRITE_SQL = """
WITH new_orders AS (
    INSERT INTO inventory_orders (id, item_id, user_id, quantity, state, created_at)
    SELECT o.id, o.item_id, o.user_id, o.quantity, 'placed', $5
    FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[])
        AS o(id, item_id, user_id, quantity)
), {idempotency}
INSERT INTO keel_outbox_events (service, event_id, event_type, payload, created_at)
SELECT $6, p.event_id, p.event_type, p.payload, $5
FROM unnest($7::text[], $8::uuid[], $9::text[]) AS p(event_type, event_id, payload)
"""
_WRITE = _WRITE_SQL.format(idempotency=pg_record_ctes(10))


def _driver(conn: Connection) -> Any:
    driver: Any = conn.connection.driver_connection
    if not driver.is_in_transaction():
        raise RuntimeError("a purchase batch must write inside its transaction")
    return driver


@dataclass(frozen=True, slots=True)
class Taken:
    left: dict[int, int]  # item id -> available after the whole batch's take
    existing: set[int]
    order_ids: list[int]


# An UPDATE joined to an array locks its rows in the join's order, not by id: a batch over
# several items first locks them in id order (one lock order everywhere; a lone item needs none).
_LOCK_ITEMS = """
SELECT id FROM inventory_items WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE
"""


def take_all(conn: Connection, purchases: list[tuple[int, int]], orders: int) -> Taken:
    """Take each item's total, where it can be taken whole; ``purchases``: (item id, quantity)."""
    distinct = sorted({item for item, _ in purchases})
    if len(distinct) > 1:
        conn.exec_driver_sql(_LOCK_ITEMS, (distinct,)).all()
    row = conn.exec_driver_sql(
        _TAKE, ([item for item, _ in purchases], [q for _, q in purchases], orders)
    ).one()
    taken, left, existing, order_ids = row
    return Taken(dict(zip(taken, left, strict=True)), set(existing), list(order_ids))


def write_all(
    conn: Connection,
    *,
    orders: list[tuple[int, int, str, int]],  # (id, item id, user id, quantity)
    created_at: datetime,
    service: str,
    events: list[tuple[str, UUID, str]],  # (event type, event id, payload)
    keys: list[Any],
) -> None:
    await_only(
        _driver(conn).execute(
            _WRITE,
            [o[0] for o in orders],
            [o[1] for o in orders],
            [o[2] for o in orders],
            [o[3] for o in orders],
            created_at,
            service,
            [e[0] for e in events],
            [e[1] for e in events],
            [e[2] for e in events],
            *keys,
        )
    )
