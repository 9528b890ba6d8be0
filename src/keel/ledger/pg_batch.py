"""A posting batch on PostgreSQL: two statements, ``BEGIN`` and ``COMMIT`` around them.

SQLAlchemy's execution path costs several times what a batch's statements do, CPU is what limits
postings per second, and under load every round trip also waits for a turn of the event loop's
HTTP work (the numbers are in the README's Performance section). So a batch runs two statements:

1. :func:`lock_and_reserve` locks the batch's accounts in id order and reserves as many entry and
   transfer ids as the batch could need (refused postings leave gaps, as a rollback would). It
   goes through SQLAlchemy's driver-level ``exec_driver_sql``, which opens the transaction;
2. :func:`write_batch` writes the transfers, entries, balances, outbox events and idempotency
   records (see :func:`keel.core.idempotency.pg_record_ctes`) with one
   statement of data-modifying CTEs fed by ``unnest`` arrays, straight through asyncpg on the
   same connection, inside that transaction.

The functions are synchronous and run inside :meth:`keel.core.database.Database.run_write`, whose
greenlet lets them wait on asyncpg with SQLAlchemy's ``await_only``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy.engine import Connection
from sqlalchemy.util import await_only

from keel.core.idempotency import pg_record_ctes

# LockRows sits above the Sort, so rows are locked in id order: two batches touching the same
# accounts queue on the first one they share and can never deadlock.
_LOCK_AND_RESERVE = """
WITH locked AS (
    SELECT id, balance, overdraft_limit FROM ledger_users
    WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE
)
SELECT
    array(SELECT id FROM locked),
    array(SELECT balance FROM locked),
    array(SELECT overdraft_limit FROM locked),
    array(SELECT nextval(pg_get_serial_sequence('ledger_entries', 'id'))
          FROM generate_series(1, $2)),
    array(SELECT nextval(pg_get_serial_sequence('ledger_transfers', 'id'))
          FROM generate_series(1, $3))
"""

# Foreign keys are checked at the end of the statement, so entries may name transfers that a
# sibling CTE inserts. The idempotency CTEs are fixed text from the core.
_WRITE_BATCH_SQL = """
WITH new_transfers AS (
    INSERT INTO ledger_transfers (id, from_user_id, to_user_id, amount, description, created_at)
    SELECT t.id, t.from_id, t.to_id, t.amount, t.description, $14
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[])
        AS t(id, from_id, to_id, amount, description)
), new_entries AS (
    INSERT INTO ledger_entries
        (id, user_id, amount, balance_after, description, transfer_id, created_at)
    SELECT e.id, e.user_id, e.amount, e.balance_after, e.description, e.transfer_id, $14
    FROM unnest($6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::text[], $11::bigint[])
        AS e(id, user_id, amount, balance_after, description, transfer_id)
), new_balances AS (
    UPDATE ledger_users AS u SET balance = b.balance
    FROM unnest($12::bigint[], $13::bigint[]) AS b(id, balance)
    WHERE u.id = b.id
), {idempotency}
INSERT INTO keel_outbox_events (service, event_id, event_type, payload, created_at)
SELECT $17, p.event_id, $16, p.payload, $14 FROM unnest($15::text[], $18::uuid[])
    AS p(payload, event_id)
"""
_WRITE_BATCH = _WRITE_BATCH_SQL.format(idempotency=pg_record_ctes(19))


def _driver(conn: Connection) -> Any:
    """The asyncpg connection under ``conn``, which must be inside the batch's transaction.

    A write outside it would commit on its own, so this is checked rather than assumed.
    """
    driver: Any = conn.connection.driver_connection
    if not driver.is_in_transaction():
        raise RuntimeError("a posting batch must write inside its transaction")
    return driver


@dataclass(frozen=True, slots=True)
class Locked:
    """What :func:`lock_and_reserve` holds for the batch."""

    accounts: list[tuple[int, int, int]]  # (id, balance, overdraft_limit) of each existing id
    entry_ids: list[int]
    transfer_ids: list[int]


def lock_and_reserve(
    conn: Connection, user_ids: list[int], *, entries: int, transfers: int
) -> Locked:
    """Open the batch's transaction, lock ``user_ids`` and reserve ids from the sequences."""
    row = conn.exec_driver_sql(_LOCK_AND_RESERVE, (user_ids, entries, transfers)).one()
    ids, balances, limits, entry_ids, transfer_ids = row
    return Locked(list(zip(ids, balances, limits, strict=True)), entry_ids, transfer_ids)


def write_batch(
    conn: Connection,
    *,
    created_at: datetime,
    transfer_rows: list[dict[str, Any]],
    entry_rows: list[dict[str, Any]],
    balances: list[tuple[int, int]],
    service: str,
    event_type: str,
    event_ids: list[UUID],
    events: list[str],
    keys: list[Any],
) -> None:
    """Insert the batch's transfers, entries and events and set its balances, in one statement.

    ``keys`` are the batch's idempotency records, from :func:`keel.core.idempotency.pg_record_args`.
    """

    def column(rows: list[dict[str, Any]], name: str) -> list[Any]:
        return [row[name] for row in rows]

    await_only(
        _driver(conn).execute(
            _WRITE_BATCH,
            column(transfer_rows, "id"),
            column(transfer_rows, "from_user_id"),
            column(transfer_rows, "to_user_id"),
            column(transfer_rows, "amount"),
            column(transfer_rows, "description"),
            column(entry_rows, "id"),
            column(entry_rows, "user_id"),
            column(entry_rows, "amount"),
            column(entry_rows, "balance_after"),
            column(entry_rows, "description"),
            column(entry_rows, "transfer_id"),
            [user_id for user_id, _ in balances],
            [balance for _, balance in balances],
            created_at,
            events,
            event_type,
            service,
            event_ids,
            *keys,
        )
    )
