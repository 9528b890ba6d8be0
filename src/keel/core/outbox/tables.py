"""The outbox's tables, in the core's metadata and migration chain.

Services may share one PostgreSQL database, so every row carries its ``service`` and each
service's worker touches only its own. Integer ids are AUTOINCREMENT on SQLite too, so an id
freed by the retention purge is never handed out again; receivers see each event's ``event_id``
(a UUIDv7), which no engine reuses either.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    Uuid,
    text,
)

from keel.core.tables import BigId, UtcDateTime, metadata

# One row per event, written in the transaction of the change it announces.
events = Table(
    "keel_outbox_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("service", String(32), nullable=False),
    Column("event_id", Uuid(), nullable=False, unique=True),
    Column("event_type", String(64), nullable=False),
    Column("payload", Text, nullable=False),  # the event's ``data``, as JSON text
    Column("created_at", UtcDateTime(), nullable=False),
    Column("dispatched_at", UtcDateTime()),
    Index(
        "ix_keel_outbox_events_undispatched",
        "service",
        "id",
        sqlite_where=text("dispatched_at IS NULL"),
        postgresql_where=text("dispatched_at IS NULL"),
    ),
    sqlite_autoincrement=True,
)

# One row per (event, webhook URL): the delivery's state, visible at GET /webhooks/deliveries.
deliveries = Table(
    "keel_webhook_deliveries",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("service", String(32), nullable=False),
    Column("event_id", BigInteger, ForeignKey("keel_outbox_events.id"), nullable=False),
    Column("url", String(2000), nullable=False),
    Column("state", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", UtcDateTime(), nullable=False),
    Column("lease_until", UtcDateTime()),
    Column("last_status", Integer),
    Column("last_error", String(500)),
    Column("delivered_at", UtcDateTime()),
    Column("created_at", UtcDateTime(), nullable=False),
    Index("ix_keel_webhook_deliveries_due", "service", "state", "next_attempt_at"),
    Index("ix_keel_webhook_deliveries_event_id", "event_id"),
    Index("ix_keel_webhook_deliveries_service_state_id", "service", "state", "id"),
    Index("ix_keel_webhook_deliveries_service_id", "service", "id"),
    sqlite_autoincrement=True,
)
