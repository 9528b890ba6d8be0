"""move the ledger's outbox and deliveries into the core outbox tables

Every existing event gets a UUIDv7 stamped with its creation time, its public id from now on.
Rows keep their order; their internal ids are shifted past any the core tables already hold
(another service sharing the database may have published first), and the copied deliveries
point at their events' new ids. The core chain (core_0002) runs first, so the tables exist.

Revision ID: ledger_0003
Revises: ledger_0002
Create Date: 2026-11-26 06:00:00
"""

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from keel.core.uuid7 import uuid7_batch

revision: str = "ledger_0003"
down_revision: str | None = "ledger_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHUNK = 5000
_meta = sa.MetaData()
_old_events = sa.Table(
    "ledger_outbox",
    _meta,
    sa.Column("id", sa.BigInteger),
    sa.Column("event_type", sa.String),
    sa.Column("payload", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("dispatched_at", sa.DateTime(timezone=True)),
)
_events = sa.Table(
    "keel_outbox_events",
    _meta,
    sa.Column("id", sa.BigInteger),
    sa.Column("service", sa.String),
    sa.Column("event_id", sa.Uuid()),
    sa.Column("event_type", sa.String),
    sa.Column("payload", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("dispatched_at", sa.DateTime(timezone=True)),
)
_DELIVERY_COLUMNS = [
    "url",
    "state",
    "attempts",
    "next_attempt_at",
    "lease_until",
    "last_status",
    "last_error",
    "delivered_at",
    "created_at",
]
_old_deliveries = sa.Table(
    "ledger_webhook_deliveries",
    _meta,
    sa.Column("id", sa.BigInteger),
    sa.Column("event_id", sa.BigInteger),
    *(sa.Column(name) for name in _DELIVERY_COLUMNS),
)
_deliveries = sa.Table(
    "keel_webhook_deliveries",
    _meta,
    sa.Column("id", sa.BigInteger),
    sa.Column("service", sa.String),
    sa.Column("event_id", sa.BigInteger),
    *(sa.Column(name) for name in _DELIVERY_COLUMNS),
)


def _max_id(conn: sa.Connection, table: sa.Table) -> int:
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(table.c.id), 0))).scalar_one())


def _high_water(conn: sa.Connection, table: sa.Table) -> int:
    """The largest id ``table`` ever handed out, purged rows included, as far as the engine knows.

    PostgreSQL's sequence remembers it; SQLite's AUTOINCREMENT counter does for the core tables,
    while the ledger's old SQLite tables had none (their ids could already be reused).
    """
    if conn.dialect.name == "postgresql":
        sequence = sa.func.pg_get_serial_sequence(table.name, "id")
        last_value = sa.func.pg_sequence_last_value(sa.cast(sequence, postgresql.REGCLASS))
        last = conn.execute(sa.select(last_value)).scalar()
    elif sa.inspect(conn).has_table("sqlite_sequence"):
        seq = sa.text("SELECT seq FROM sqlite_sequence WHERE name = :name")
        last = conn.execute(seq, {"name": table.name}).scalar()
    else:
        last = None
    return max(_max_id(conn, table), int(last or 0))


def _unix_ms(at: datetime) -> int:
    return int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() * 1000)


def _copy_events(conn: sa.Connection, shift: int) -> None:
    last = 0
    while True:
        rows = conn.execute(
            sa.select(_old_events).where(_old_events.c.id > last).order_by("id").limit(_CHUNK)
        ).all()
        if not rows:
            return
        conn.execute(
            _events.insert(),
            [
                {
                    "id": row.id + shift,
                    "service": "ledger",
                    "event_id": uuid7_batch(1, _unix_ms(row.created_at))[0],
                    "event_type": row.event_type,
                    # The payload was {"type", "data"}; the core keeps the data alone.
                    "payload": json.dumps(
                        json.loads(row.payload).get("data"), separators=(",", ":")
                    ),
                    "created_at": row.created_at,
                    "dispatched_at": row.dispatched_at,
                }
                for row in rows
            ],
        )
        last = rows[-1].id


def _copy_deliveries(conn: sa.Connection, event_shift: int, shift: int) -> None:
    old = _old_deliveries.c
    conn.execute(
        _deliveries.insert().from_select(
            ["id", "service", "event_id", *_DELIVERY_COLUMNS],
            sa.select(
                old.id + shift,
                sa.literal("ledger"),
                old.event_id + event_shift,
                *(old[name] for name in _DELIVERY_COLUMNS),
            ),
        )
    )


def _advance_sequences(conn: sa.Connection, floors: dict[str, int]) -> None:
    """PostgreSQL's sequences do not see explicit ids (SQLite's AUTOINCREMENT counter does).

    Each moves past every id handed out before, copied or purged (``floors``), never back.
    """
    if conn.dialect.name != "postgresql":
        return
    for table in (_events, _deliveries):
        top = max(_high_water(conn, table), floors[table.name])
        if top:
            conn.execute(
                sa.select(sa.func.setval(sa.func.pg_get_serial_sequence(table.name, "id"), top))
            )


def upgrade() -> None:
    conn = op.get_bind()
    # Past every id the core tables ever handed out, so no copied row takes a purged row's id.
    shift, delivery_shift = _high_water(conn, _events), _high_water(conn, _deliveries)
    floors = {
        _events.name: shift + _high_water(conn, _old_events),
        _deliveries.name: delivery_shift + _high_water(conn, _old_deliveries),
    }
    _copy_events(conn, shift)
    _copy_deliveries(conn, shift, delivery_shift)
    _advance_sequences(conn, floors)
    op.drop_table("ledger_webhook_deliveries")  # its indexes go with it
    op.drop_table("ledger_outbox")


def downgrade() -> None:
    """Recreate the ledger's own tables (ids kept) and move its rows back; the UUIDs are lost."""
    _id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "ledger_outbox",
        sa.Column("id", _id, autoincrement=True, nullable=False),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_outbox")),
    )
    op.create_index(
        "ix_ledger_outbox_undispatched",
        "ledger_outbox",
        ["id"],
        sqlite_where=sa.text("dispatched_at IS NULL"),
        postgresql_where=sa.text("dispatched_at IS NULL"),
    )
    op.create_table(
        "ledger_webhook_deliveries",
        sa.Column("id", _id, autoincrement=True, nullable=False),
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
            ["ledger_outbox.id"],
            name=op.f("fk_ledger_webhook_deliveries_event_id_ledger_outbox"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_webhook_deliveries")),
    )
    op.create_index(
        "ix_ledger_webhook_deliveries_due",
        "ledger_webhook_deliveries",
        ["state", "next_attempt_at"],
    )
    op.create_index(
        "ix_ledger_webhook_deliveries_event_id", "ledger_webhook_deliveries", ["event_id"]
    )
    op.create_index(
        "ix_ledger_webhook_deliveries_state_id", "ledger_webhook_deliveries", ["state", "id"]
    )
    columns = ", ".join(_DELIVERY_COLUMNS)  # constant names: no input reaches this SQL
    op.execute(
        "INSERT INTO ledger_outbox (id, event_type, payload, created_at, dispatched_at) "
        "SELECT id, event_type, '{\"type\":\"' || event_type || '\",\"data\":' || payload || '}', "
        "created_at, dispatched_at FROM keel_outbox_events WHERE service = 'ledger'"
    )
    op.execute(
        f"INSERT INTO ledger_webhook_deliveries (id, event_id, {columns}) "  # noqa: S608
        f"SELECT id, event_id, {columns} FROM keel_webhook_deliveries WHERE service = 'ledger'"
    )
    op.execute("DELETE FROM keel_webhook_deliveries WHERE service = 'ledger'")
    op.execute("DELETE FROM keel_outbox_events WHERE service = 'ledger'")
