"""outbox events, webhook deliveries, maintenance leases

Revision ID: core_0002
Revises: core_0001
Create Date: 2026-11-26 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "core_0002"
down_revision: str | None = "core_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "keel_outbox_events",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("service", sa.String(length=32), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keel_outbox_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_keel_outbox_events_event_id")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_keel_outbox_events_undispatched",
        "keel_outbox_events",
        ["service", "id"],
        sqlite_where=sa.text("dispatched_at IS NULL"),
        postgresql_where=sa.text("dispatched_at IS NULL"),
    )
    op.create_table(
        "keel_webhook_deliveries",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("service", sa.String(length=32), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["keel_outbox_events.id"],
            name=op.f("fk_keel_webhook_deliveries_event_id_keel_outbox_events"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keel_webhook_deliveries")),
        sqlite_autoincrement=True,
    )
    for name, columns in [
        ("ix_keel_webhook_deliveries_due", ["service", "state", "next_attempt_at"]),
        ("ix_keel_webhook_deliveries_event_id", ["event_id"]),
        ("ix_keel_webhook_deliveries_service_state_id", ["service", "state", "id"]),
        ("ix_keel_webhook_deliveries_service_id", ["service", "id"]),
    ]:
        op.create_index(name, "keel_webhook_deliveries", columns)
    op.create_table(
        "keel_maintenance_leases",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("holder", sa.String(length=100), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_keel_maintenance_leases")),
    )


def downgrade() -> None:
    op.drop_table("keel_maintenance_leases")
    op.drop_table("keel_webhook_deliveries")  # its indexes go with it
    op.drop_table("keel_outbox_events")
