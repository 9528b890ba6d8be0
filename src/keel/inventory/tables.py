"""The inventory's tables.

Every stock movement is one conditional statement on ``inventory_items`` (``… WHERE available >=
:q``), and the database checks the invariant itself on every row it writes: ``available +
reserved + sold = initial + restocked``, every term non-negative. A bug that broke it would fail
its transaction, not corrupt the stock.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    text,
)

from keel.core.outbox import Outbox
from keel.core.tables import NAMING_CONVENTION, BigId, UtcDateTime

metadata = MetaData(naming_convention=NAMING_CONVENTION)

OUTBOX = Outbox(
    "inventory", ["order.placed", "order.cancelled", "reservation.expired", "item.sold_out"]
)

items = Table(
    "inventory_items",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("sku", String(64), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("available", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False, server_default="0"),
    Column("sold", BigInteger, nullable=False, server_default="0"),
    Column("initial", BigInteger, nullable=False),
    Column("restocked", BigInteger, nullable=False, server_default="0"),
    Column("max_per_user", BigInteger),
    Column("created_at", UtcDateTime(), nullable=False),
    CheckConstraint("available >= 0", name="available_non_negative"),
    CheckConstraint("reserved >= 0", name="reserved_non_negative"),
    CheckConstraint("sold >= 0", name="sold_non_negative"),
    CheckConstraint("initial >= 0 AND restocked >= 0", name="supply_non_negative"),
    CheckConstraint("available + reserved + sold = initial + restocked", name="stock_conserved"),
    CheckConstraint("max_per_user IS NULL OR max_per_user >= 1", name="max_per_user_positive"),
)

# What each user holds of an item (held + bought, not cancelled), for ``max_per_user``; only
# items with a limit keep rows here.
holdings = Table(
    "inventory_holdings",
    metadata,
    Column("item_id", BigInteger, ForeignKey("inventory_items.id"), primary_key=True),
    Column("user_id", String(128), primary_key=True),
    Column("quantity", BigInteger, nullable=False),
    CheckConstraint("quantity >= 0", name="quantity_non_negative"),
)

reservations = Table(
    "inventory_reservations",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("item_id", BigInteger, ForeignKey("inventory_items.id"), nullable=False),
    Column("user_id", String(128), nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),  # held | confirmed | released | expired
    Column("expires_at", UtcDateTime(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("order_id", BigInteger),
    CheckConstraint("quantity >= 1", name="quantity_positive"),
    CheckConstraint("state IN ('held', 'confirmed', 'released', 'expired')", name="state_known"),
    Index(
        "ix_inventory_reservations_held_expires_at",
        "expires_at",
        sqlite_where=text("state = 'held'"),
        postgresql_where=text("state = 'held'"),
    ),
)

orders = Table(
    "inventory_orders",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("item_id", BigInteger, ForeignKey("inventory_items.id"), nullable=False),
    Column("user_id", String(128), nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),  # placed | cancelled
    Column("reservation_id", BigInteger),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("cancelled_at", UtcDateTime()),
    CheckConstraint("quantity >= 1", name="quantity_positive"),
    CheckConstraint("state IN ('placed', 'cancelled')", name="state_known"),
    Index("ix_inventory_orders_item_id_id", "item_id", "id"),
)
