"""The ledger's tables.

``ledger_users.balance`` is a cached sum: it is only ever changed in the transaction that
inserts the matching ``ledger_entries`` row, and ``GET /audit`` re-checks it against the entries.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

from keel.core.tables import NAMING_CONVENTION, BigId, UtcDateTime

metadata = MetaData(naming_convention=NAMING_CONVENTION)

users = Table(
    "ledger_users",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("email", String(254)),
    Column("balance", BigInteger, nullable=False, server_default="0"),
    Column("overdraft_limit", BigInteger, nullable=False, server_default="0"),
    Column("created_at", UtcDateTime(), nullable=False),
    CheckConstraint("balance >= -overdraft_limit", name="balance_within_overdraft"),
    CheckConstraint("overdraft_limit >= 0", name="overdraft_limit_non_negative"),
)

transfers = Table(
    "ledger_transfers",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("from_user_id", BigInteger, ForeignKey("ledger_users.id"), nullable=False),
    Column("to_user_id", BigInteger, ForeignKey("ledger_users.id"), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("description", String(500), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    CheckConstraint("amount > 0", name="amount_positive"),
)

entries = Table(
    "ledger_entries",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("user_id", BigInteger, ForeignKey("ledger_users.id"), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("balance_after", BigInteger, nullable=False),
    Column("description", String(500), nullable=False),
    Column("transfer_id", BigInteger, ForeignKey("ledger_transfers.id")),
    Column("created_at", UtcDateTime(), nullable=False),
    CheckConstraint("amount <> 0", name="amount_non_zero"),
    Index("ix_ledger_entries_user_id_id", "user_id", "id"),
)

# Transactional outbox: one row per event, written with the entry it announces.
outbox = Table(
    "ledger_outbox",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("event_type", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("dispatched_at", UtcDateTime()),
    Index(
        "ix_ledger_outbox_undispatched",
        "id",
        sqlite_where=text("dispatched_at IS NULL"),
        postgresql_where=text("dispatched_at IS NULL"),
    ),
)

# One row per (event, webhook URL): the delivery's state, visible at GET /webhooks/deliveries.
deliveries = Table(
    "ledger_webhook_deliveries",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("event_id", BigInteger, ForeignKey("ledger_outbox.id"), nullable=False),
    Column("url", String(2000), nullable=False),
    Column("state", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", UtcDateTime(), nullable=False),
    Column("lease_until", UtcDateTime()),
    Column("last_status", Integer),
    Column("last_error", String(500)),
    Column("delivered_at", UtcDateTime()),
    Column("created_at", UtcDateTime(), nullable=False),
    Index("ix_ledger_webhook_deliveries_due", "state", "next_attempt_at"),
    Index("ix_ledger_webhook_deliveries_event_id", "event_id"),
    Index("ix_ledger_webhook_deliveries_state_id", "state", "id"),
)
