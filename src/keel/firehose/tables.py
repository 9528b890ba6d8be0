"""The firehose's tables: the events it stores and the ones the store refused.

``firehose_events`` is append-only. Its unique ``event_id`` is what makes every retry, replay and
re-delivery from a buffer store an event exactly once; ids keel generates are UUIDv7, so that
index grows at its right edge. Times are epoch microseconds (BIGINT) on both engines.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB

from keel.core.tables import NAMING_CONVENTION, BigId

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# 16 raw bytes on SQLite (half the index of a hex string), the native uuid type on PostgreSQL.
EventId = Uuid(as_uuid=True).with_variant(LargeBinary(16), "sqlite")
Metadata = Text().with_variant(JSONB(), "postgresql")

events = Table(
    "firehose_events",
    metadata,
    Column("seq", BigId, primary_key=True, autoincrement=True),
    Column("event_id", EventId, nullable=False, unique=True),
    Column("user_id", String(255), nullable=False),
    Column("name", String(200)),
    Column("timestamp_us", BigInteger, nullable=False),
    Column("original_timestamp_us", BigInteger, nullable=False),
    Column("sent_at_us", BigInteger),
    Column("received_at_us", BigInteger, nullable=False),
    Column("metadata", Metadata),
    # Every index costs ingest: the unique id, and time for /stats and since/until, both
    # near-sequential. No index on user_id or name: events of many users land on scattered
    # pages of one, which more than doubled SQLite's insert cost (9.1 µs an event against
    # 4.7, measured). Those filters read a bounded window of the newest events per page.
    Index("ix_firehose_events_timestamp_us", "timestamp_us"),
)

dead_letters = Table(
    "firehose_dead_letters",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("event_id", EventId, nullable=False, unique=True),  # a refused retry: one letter
    Column("event", Text, nullable=False),  # the event as JSON text; TEXT keeps what JSONB refused
    Column("reason", Text, nullable=False),
    Column("failed_at_us", BigInteger, nullable=False),
)
