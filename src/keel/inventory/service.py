"""The inventory's rules off the purchase hot path: items, holds, cancels, the expiry sweep.

Each function runs inside the caller's one write transaction (a route's, through
``Idempotency.run``), as synchronous code on its connection. Stock moves through the conditional
statements of :mod:`keel.inventory.stock` (a restock, which only adds, is its own statement
here), always the item's stock row before its holdings rows.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from keel.core.schemas import Page, encode_cursor
from keel.inventory import stock
from keel.inventory.errors import (
    AlreadyCancelled,
    ItemNotFound,
    LimitExceeded,
    OrderNotFound,
    ReservationConfirmed,
    ReservationExpired,
    ReservationNotFound,
    ReservationReleased,
    SkuTaken,
    SoldOut,
    StockOutOfRange,
)
from keel.inventory.schemas import (
    MAX_STOCK,
    Item,
    ItemCreate,
    Order,
    Reservation,
    ReservationCreate,
)
from keel.inventory.tables import OUTBOX, items, orders, reservations

SWEEP_ROWS = 1000


def _now() -> datetime:
    return datetime.now(UTC)


def _item(row: Any) -> Item:
    return Item.model_validate(row._mapping)


def create_item(conn: Connection, body: ItemCreate) -> Item:
    values = {
        "sku": body.sku,
        "name": body.name,
        "available": body.stock,
        "initial": body.stock,
        "max_per_user": body.max_per_user,
        "created_at": _now(),
    }
    try:
        with conn.begin_nested():
            row = conn.execute(insert(items).values(values).returning(*items.c)).one()
    except IntegrityError as exc:
        if "sku" in str(exc.orig).lower():
            raise SkuTaken(f"An item with SKU {body.sku!r} exists.") from None
        raise
    return _item(row)


def get_item(conn: Connection, item_id: int) -> Item:
    row = conn.execute(select(items).where(items.c.id == item_id)).first()
    if row is None:
        raise ItemNotFound(f"No item with id {item_id}.")
    return _item(row)


def list_items(conn: Connection, after: int | None, limit: int) -> Page[Item]:
    statement = select(items).order_by(items.c.id).limit(limit + 1)
    if after is not None:
        statement = statement.where(items.c.id > after)
    rows = conn.execute(statement).all()
    found = [_item(row) for row in rows[:limit]]
    return Page(items=found, next_cursor=encode_cursor(found[-1].id) if len(rows) > limit else None)


def restock(conn: Connection, item_id: int, quantity: int) -> Item:
    row = conn.execute(
        update(items)
        .where(items.c.id == item_id, items.c.initial + items.c.restocked <= MAX_STOCK - quantity)
        .values(available=items.c.available + quantity, restocked=items.c.restocked + quantity)
        .returning(*items.c)
    ).first()
    if row is None:
        get_item(conn, item_id)  # 404 if unknown
        raise StockOutOfRange(f"Item {item_id} would hold more than {MAX_STOCK} units.")
    return _item(row)


def _reservation(row: Any, now: datetime | None = None) -> Reservation:
    state = row.state
    if state == "held" and row.expires_at <= (now or _now()):
        state = "expired"  # past its time: expired, whether or not the sweeper has been by
    return Reservation(
        reservation_id=row.id,
        item_id=row.item_id,
        user_id=row.user_id,
        quantity=row.quantity,
        state=state,
        expires_at=row.expires_at,
        order_id=row.order_id,
    )


def reserve(
    conn: Connection, body: ReservationCreate, user_id: str, max_seconds: int
) -> Reservation:
    exists, limit = stock.limit_of(conn, body.item_id)
    if not exists:
        raise ItemNotFound(f"No item with id {body.item_id}.")
    # The stock row first, then the holding (the one lock order); a refusal rolls both back.
    left = stock.take(conn, body.item_id, body.quantity, hold=True)
    if left is None:
        raise SoldOut(f"Item {body.item_id} has fewer than {body.quantity} left.")
    if limit is not None and not stock.add_holding(
        conn, body.item_id, user_id, body.quantity, limit
    ):
        raise LimitExceeded(f"User {user_id} may hold at most {limit} of item {body.item_id}.")
    now = _now()
    expires_at = now + timedelta(seconds=min(body.ttl_seconds, max_seconds))
    row = conn.execute(
        insert(reservations)
        .values(
            item_id=body.item_id,
            user_id=user_id,
            quantity=body.quantity,
            state="held",
            expires_at=expires_at,
            created_at=now,
        )
        .returning(*reservations.c)
    ).one()
    if left == 0:
        stock.publish_sold_out(conn, [body.item_id], now)
    return _reservation(row, now)


def get_reservation(conn: Connection, reservation_id: int) -> Reservation:
    row = conn.execute(select(reservations).where(reservations.c.id == reservation_id)).first()
    if row is None:
        raise ReservationNotFound(f"No reservation with id {reservation_id}.")
    return _reservation(row)


def _refuse_unheld(conn: Connection, reservation_id: int) -> NoReturn:
    """Raise why the reservation is not an unexpired hold."""
    held = get_reservation(conn, reservation_id)
    raise {
        "expired": ReservationExpired(f"Reservation {reservation_id} has expired."),
        "released": ReservationReleased(f"Reservation {reservation_id} was released."),
        "confirmed": ReservationConfirmed(
            f"Reservation {reservation_id} was confirmed as order {held.order_id}."
        ),
    }[held.state]


def confirm(conn: Connection, reservation_id: int) -> Order:
    """Turn an unexpired hold into an order; an expired one is refused even before the sweep."""
    now = _now()
    row = conn.execute(
        update(reservations)
        .where(
            reservations.c.id == reservation_id,
            reservations.c.state == "held",
            reservations.c.expires_at > now,
        )
        .values(state="confirmed")
        .returning(*reservations.c)
    ).first()
    if row is None:
        _refuse_unheld(conn, reservation_id)
    left = stock.settle_hold(conn, row.item_id, row.quantity)
    order_id = conn.execute(
        insert(orders)
        .values(
            item_id=row.item_id,
            user_id=row.user_id,
            quantity=row.quantity,
            state="placed",
            reservation_id=row.id,
            created_at=now,
        )
        .returning(orders.c.id)
    ).scalar_one()
    conn.execute(update(reservations).where(reservations.c.id == row.id).values(order_id=order_id))
    order = Order(
        order_id=order_id,
        item_id=row.item_id,
        user_id=row.user_id,
        quantity=row.quantity,
        state="placed",
        remaining=left,
        reservation_id=row.id,
        created_at=now,
    )
    OUTBOX.publish(conn, "order.placed", order)
    return order


def release(conn: Connection, reservation_id: int) -> None:
    """Give a hold's stock back; releasing a released hold again changes nothing."""
    row = conn.execute(
        update(reservations)
        .where(
            reservations.c.id == reservation_id,
            reservations.c.state == "held",
            reservations.c.expires_at > _now(),
        )
        .values(state="released")
        .returning(*reservations.c)
    ).first()
    if row is None:
        current = get_reservation(conn, reservation_id)
        if current.state == "released":
            return
        _refuse_unheld(conn, reservation_id)
    stock.give_back(conn, row.item_id, row.quantity, source="reserved")
    stock.drop_holding(conn, row.item_id, row.user_id, row.quantity)


def expire_due(conn: Connection, limit: int = SWEEP_ROWS) -> int:
    """Expire up to ``limit`` holds past their time and return their stock; returns how many.

    Safe with any number of sweepers: the conditional UPDATE expires each hold once (PostgreSQL
    re-checks ``state`` on a row another sweeper changed while it waited).
    """
    now = _now()
    due = (
        select(reservations.c.id)
        .where(reservations.c.state == "held", reservations.c.expires_at <= now)
        .order_by(reservations.c.expires_at)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":  # sweepers in other processes take other holds
        due = due.with_for_update(skip_locked=True)
    rows = conn.execute(
        update(reservations)
        .where(reservations.c.id.in_(due.scalar_subquery()), reservations.c.state == "held")
        .values(state="expired")
        .returning(*reservations.c)
    ).all()
    returned: dict[int, int] = defaultdict(int)
    held: dict[tuple[int, str], int] = defaultdict(int)
    for row in rows:
        returned[row.item_id] += row.quantity
        held[(row.item_id, row.user_id)] += row.quantity
    for item_id in sorted(returned):  # stock rows first, in id order: the one lock order
        stock.give_back(conn, item_id, returned[item_id], source="reserved")
    limited = set(
        conn.execute(
            select(items.c.id).where(items.c.id.in_(returned), items.c.max_per_user.is_not(None))
        ).scalars()
    )
    stock.drop_holdings(conn, {pair: q for pair, q in held.items() if pair[0] in limited})
    if rows:
        OUTBOX.publish_many(
            conn,
            "reservation.expired",
            [_reservation(row, now).model_dump_json() for row in rows],
            created_at=now,
        )
    return len(rows)


def any_due(conn: Connection) -> bool:
    """Whether a hold is past its time: a read, so idle sweeps take no write lock."""
    now = _now()
    query = select(reservations.c.id).where(
        reservations.c.state == "held", reservations.c.expires_at <= now
    )
    return conn.execute(query.limit(1)).first() is not None


def _order(row: Any) -> Order:
    return Order(
        order_id=row.id,
        item_id=row.item_id,
        user_id=row.user_id,
        quantity=row.quantity,
        state=row.state,
        reservation_id=row.reservation_id,
        created_at=row.created_at,
        cancelled_at=row.cancelled_at,
    )


def cancel(conn: Connection, order_id: int) -> Order:
    """Cancel a placed order and return its stock; a second cancel is 409 ``already_cancelled``."""
    row = conn.execute(
        update(orders)
        .where(orders.c.id == order_id, orders.c.state == "placed")
        .values(state="cancelled", cancelled_at=_now())
        .returning(*orders.c)
    ).first()
    if row is None:
        exists = conn.execute(select(orders.c.id).where(orders.c.id == order_id)).first()
        if exists is None:
            raise OrderNotFound(f"No order with id {order_id}.")
        raise AlreadyCancelled(f"Order {order_id} is already cancelled.")
    stock.give_back(conn, row.item_id, row.quantity, source="sold")
    stock.drop_holding(conn, row.item_id, row.user_id, row.quantity)
    order = _order(row)
    OUTBOX.publish(conn, "order.cancelled", order)
    return order


def list_orders(conn: Connection, item_id: int, after: int | None, limit: int) -> Page[Order]:
    get_item(conn, item_id)
    statement = (
        select(orders).where(orders.c.item_id == item_id).order_by(orders.c.id).limit(limit + 1)
    )
    if after is not None:
        statement = statement.where(orders.c.id > after)
    rows = conn.execute(statement).all()
    found = [_order(row) for row in rows[:limit]]
    return Page(
        items=found, next_cursor=encode_cursor(found[-1].order_id) if len(rows) > limit else None
    )
