"""Tables every service database has: API keys, idempotency records, maintenance leases.

They live in their own migration chain (``keel.core.migrations``), applied to each service's
database before the service's own chain, so services sharing one PostgreSQL share one key set.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
)

# Explicit constraint names, so migrations can refer to them on every engine.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; BIGINT there would not.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that always comes back timezone-aware UTC (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
            return value.replace(tzinfo=None) if dialect.name == "sqlite" else value
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    def __repr__(self) -> str:  # what autogenerate writes into migrations
        return "sa.DateTime(timezone=True)"


metadata = MetaData(naming_convention=NAMING_CONVENTION)

api_keys = Table(
    "keel_api_keys",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("prefix", String(16), nullable=False),
    Column("key_hash", LargeBinary(32), nullable=False, unique=True),
    Column("scope", String(16), nullable=False),
    Column("name", String(200), nullable=False, server_default=""),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("revoked_at", UtcDateTime()),
)

idempotency_keys = Table(
    "keel_idempotency_keys",
    metadata,
    Column("service", String(32), primary_key=True),
    Column("api_key_id", BigInteger, primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("request_hash", LargeBinary(32), nullable=False),
    Column("response_status", Integer),
    Column("response_body", Text),
    Column("created_at", UtcDateTime(), nullable=False),
    Index("ix_keel_idempotency_keys_created_at", "created_at"),
)

# One row per periodic job (``<service>:<job>``): who runs it now and when it is next due, so one
# process at a time runs it, across processes and hosts (see keel.core.maintenance).
maintenance_leases = Table(
    "keel_maintenance_leases",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("holder", String(100)),
    Column("lease_until", UtcDateTime(), nullable=False),
    Column("next_run_at", UtcDateTime(), nullable=False),
)
