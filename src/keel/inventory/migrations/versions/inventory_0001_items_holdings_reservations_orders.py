"""items, holdings, reservations, orders

Revision ID: inventory_0001
Revises:
Create Date: 2026-11-26 08:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from keel.core.tables import UtcDateTime

revision: str = "inventory_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "inventory_items",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("sku", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("available", sa.BigInteger(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("sold", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("initial", sa.BigInteger(), nullable=False),
        sa.Column("restocked", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("max_per_user", sa.BigInteger(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.CheckConstraint(
            "available >= 0", name=op.f("ck_inventory_items_available_non_negative")
        ),
        sa.CheckConstraint("reserved >= 0", name=op.f("ck_inventory_items_reserved_non_negative")),
        sa.CheckConstraint("sold >= 0", name=op.f("ck_inventory_items_sold_non_negative")),
        sa.CheckConstraint(
            "initial >= 0 AND restocked >= 0", name=op.f("ck_inventory_items_supply_non_negative")
        ),
        sa.CheckConstraint(
            "available + reserved + sold = initial + restocked",
            name=op.f("ck_inventory_items_stock_conserved"),
        ),
        sa.CheckConstraint(
            "max_per_user IS NULL OR max_per_user >= 1",
            name=op.f("ck_inventory_items_max_per_user_positive"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inventory_items")),
        sa.UniqueConstraint("sku", name=op.f("uq_inventory_items_sku")),
    )
    op.create_table(
        "inventory_holdings",
        sa.Column("item_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "quantity >= 0", name=op.f("ck_inventory_holdings_quantity_non_negative")
        ),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["inventory_items.id"],
            name=op.f("fk_inventory_holdings_item_id_inventory_items"),
        ),
        sa.PrimaryKeyConstraint("item_id", "user_id", name=op.f("pk_inventory_holdings")),
    )
    op.create_table(
        "inventory_reservations",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("item_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("order_id", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "quantity >= 1", name=op.f("ck_inventory_reservations_quantity_positive")
        ),
        sa.CheckConstraint(
            "state IN ('held', 'confirmed', 'released', 'expired')",
            name=op.f("ck_inventory_reservations_state_known"),
        ),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["inventory_items.id"],
            name=op.f("fk_inventory_reservations_item_id_inventory_items"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inventory_reservations")),
    )
    op.create_index(
        "ix_inventory_reservations_held_expires_at",
        "inventory_reservations",
        ["expires_at"],
        sqlite_where=sa.text("state = 'held'"),
        postgresql_where=sa.text("state = 'held'"),
    )
    op.create_table(
        "inventory_orders",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("item_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reservation_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("cancelled_at", UtcDateTime(), nullable=True),
        sa.CheckConstraint("quantity >= 1", name=op.f("ck_inventory_orders_quantity_positive")),
        sa.CheckConstraint(
            "state IN ('placed', 'cancelled')", name=op.f("ck_inventory_orders_state_known")
        ),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["inventory_items.id"],
            name=op.f("fk_inventory_orders_item_id_inventory_items"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inventory_orders")),
    )
    op.create_index("ix_inventory_orders_item_id_id", "inventory_orders", ["item_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_inventory_orders_item_id_id", table_name="inventory_orders")
    op.drop_table("inventory_orders")
    op.drop_index("ix_inventory_reservations_held_expires_at", table_name="inventory_reservations")
    op.drop_table("inventory_reservations")
    op.drop_table("inventory_holdings")
    op.drop_table("inventory_items")
