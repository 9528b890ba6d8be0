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
    MetaData,
    String,
    Table,
)

from keel.core.outbox import Outbox
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

# The ledger's events go through the core's transactional outbox, written with their entries.
OUTBOX = Outbox(service="ledger", event_types=["transaction.posted"])
