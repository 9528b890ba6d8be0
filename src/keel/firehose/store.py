"""Writing events into the store, exactly once each, and setting aside what the store refuses.

Every path into ``firehose_events`` (the direct group commit, the spool and Redis writers, a
dead-letter replay) inserts with ``ON CONFLICT (event_id) DO NOTHING``: a buffer may hand the
same event over twice (a writer that died between the store's commit and its acknowledgement),
and a client may send it twice; either way it is stored once.

A batch the store refuses for its data (PostgreSQL refuses ``\\u0000`` in JSONB, for one) is split
in halves until the refused events stand alone; those go to ``firehose_dead_letters`` with the
store's reason, and the rest are stored. Any other failure (the store is down) raises, and the
events stay in their buffer.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from itertools import chain
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.util import await_only

from keel.core.database import Database
from keel.core.errors import sqlstate_of
from keel.firehose.events import EventRow, now_us

log = logging.getLogger("keel.firehose")

COLUMNS = (
    "event_id",
    "user_id",
    "name",
    "timestamp_us",
    "original_timestamp_us",
    "sent_at_us",
    "received_at_us",
    "metadata",
)
_SQLITE_INSERT = (
    "INSERT INTO firehose_events"
    " (event_id, user_id, name, timestamp_us, original_timestamp_us,"
    " sent_at_us, received_at_us, metadata)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING"
)
_PG_INSERT = (
    "INSERT INTO firehose_events"
    " (event_id, user_id, name, timestamp_us, original_timestamp_us,"
    " sent_at_us, received_at_us, metadata)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (event_id) DO NOTHING"
)
_PG_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS firehose_staging ("
    " event_id uuid, user_id text, name text, timestamp_us bigint,"
    " original_timestamp_us bigint, sent_at_us bigint, received_at_us bigint, metadata jsonb"
    ") ON COMMIT DELETE ROWS"
)
_PG_FROM_STAGING = (
    "INSERT INTO firehose_events (event_id, user_id, name, timestamp_us,"
    " original_timestamp_us, sent_at_us, received_at_us, metadata)"
    " SELECT event_id, user_id, name, timestamp_us,"
    " original_timestamp_us, sent_at_us, received_at_us, metadata"
    " FROM firehose_staging ON CONFLICT (event_id) DO NOTHING"
)
# One dead letter per event: a refused event sent again (a client's retry, a replay) updates it.
_DEAD_LETTER_SQLITE = (
    "INSERT INTO firehose_dead_letters (event_id, event, reason, failed_at_us) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (event_id) DO UPDATE SET reason = excluded.reason,"
    " failed_at_us = excluded.failed_at_us"
)
_DEAD_LETTER_PG = (
    "INSERT INTO firehose_dead_letters (event_id, event, reason, failed_at_us)"
    " VALUES ($1, $2, $3, $4)"
    " ON CONFLICT (event_id) DO UPDATE SET reason = excluded.reason,"
    " failed_at_us = excluded.failed_at_us"
)


def refused_for_its_data(exc: BaseException) -> bool:
    """Whether the store refused the rows themselves (SQLSTATE class 22, data exception)."""
    state = sqlstate_of(exc)
    return state is not None and state.startswith("22")


def event_json(row: EventRow) -> str:
    """The event as JSON text, as a dead letter keeps it and a replay decodes it again."""
    body: dict[str, Any] = row._asdict()
    body["event_id"] = str(row.event_id)
    body["metadata"] = row.metadata  # text: JSON the store could not take may not parse back
    return json.dumps(body)


def row_from_json(text: str) -> EventRow:
    body = json.loads(text)
    from uuid import UUID

    body["event_id"] = UUID(body["event_id"])
    return EventRow(**body)


def insert_rows(conn: Connection, rows: Sequence[EventRow]) -> None:
    """Insert ``rows`` inside the caller's transaction (the direct buffer's group commit).

    Refused rows are dead-lettered in the same transaction, each tried under a savepoint.
    """
    if isinstance(conn.connection.driver_connection, sqlite3.Connection):
        insert_sqlite_values(conn, [sqlite_values(rows)])  # Database.run_write's plain connection
        return
    _insert_or_split(conn, list(rows))


def _insert_or_split(conn: Connection, rows: list[EventRow]) -> None:
    """Insert under a savepoint; if the store refuses the rows' data, halve until the refused
    ones stand alone (a few dozen statements for one bad event in thousands, not one per row)."""
    try:
        with conn.begin_nested():
            if len(rows) >= COPY_FROM_ROWS:
                _copy_in_transaction(conn.connection.driver_connection, rows)
            else:
                conn.exec_driver_sql(_PG_INSERT, rows)
        return
    except Exception as exc:  # raw asyncpg errors from COPY, or SQLAlchemy's from the INSERT
        if not refused_for_its_data(exc):
            raise
        if len(rows) == 1:
            [row] = rows
            log.warning("event %s refused by the store: %s", row.event_id, _reason(exc))
            conn.exec_driver_sql(
                _DEAD_LETTER_PG, (row.event_id, event_json(row), _reason(exc), now_us())
            )
            return
    half = len(rows) // 2
    _insert_or_split(conn, rows[:half])
    _insert_or_split(conn, rows[half:])


# From this many rows a group commit goes through COPY and a staging table; below it, one
# pipelined executemany costs fewer round trips. Measured with `keel bench firehose` on batches
# of 500: PostgreSQL's CPU per batch fell from 11.2 to 9.6 ms (its indexes cost the rest).
COPY_FROM_ROWS = 100


def _copy_in_transaction(driver: Any, rows: Sequence[EventRow]) -> None:
    """COPY ``rows`` into the staging table and insert them from there, inside the caller's
    transaction (on SQLAlchemy's greenlet bridge, as the driver's own calls are)."""
    await_only(driver.execute(_PG_STAGING))
    await_only(driver.copy_records_to_table("firehose_staging", records=rows, columns=COLUMNS))
    await_only(driver.execute(_PG_FROM_STAGING))
    # Emptied now, not at COMMIT: a refused half's retry in the same transaction copies again.
    await_only(driver.execute("DELETE FROM firehose_staging"))


# On SQLite a group commit inserts 100 rows a statement: one statement binds and steps once for
# them all, where executemany paid its per-row overhead (a step, a reset, a Python call per row)
# under the writer lock. Measured on batches of 500 UUIDv7 events: 3.0 → 1.85 µs an event under
# the lock. 100 rows are 800 variables, below even old SQLite builds' limit of 999.
SQLITE_ROWS_PER_INSERT = 100
_WIDTH = len(COLUMNS)
_SQLITE_INSERT_MANY = _SQLITE_INSERT.replace(
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    "VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * SQLITE_ROWS_PER_INSERT),
)


def sqlite_values(rows: Sequence[EventRow]) -> list[Any]:
    """``rows`` as SQLite's insert takes them: all their values in one flat list, each id as its
    16 bytes. The direct buffer builds them in the request's own task, so the writers' turn holds
    the lock for the insert alone."""
    values: list[Any] = list(chain.from_iterable(rows))
    values[0::_WIDTH] = [row[0].bytes for row in rows]
    return values


def sqlite_events(values: list[Any]) -> int:
    """How many events one :func:`sqlite_values` holds."""
    return len(values) // _WIDTH


def insert_sqlite_values(conn: Connection, requests: Iterable[list[Any]]) -> None:
    """Insert the :func:`sqlite_values` of many requests in the caller's transaction, on a plain
    sqlite3 connection, 100 rows a statement, in the order submitted: the rows get their seq in
    arrival order, and of an id sent twice the first copy is the one kept."""
    driver: Any = conn.connection.driver_connection
    values = list(chain.from_iterable(requests))  # one pointer copy a value
    step = SQLITE_ROWS_PER_INSERT * _WIDTH
    whole = len(values) - len(values) % step
    for start in range(0, whole, step):
        driver.execute(_SQLITE_INSERT_MANY, values[start : start + step])
    if whole < len(values):  # under 100 rows left: one statement each (two statements cached)
        driver.executemany(_SQLITE_INSERT, _rows_of(values[whole:]))


def _rows_of(values: list[Any]) -> Iterator[list[Any]]:
    return (values[start : start + _WIDTH] for start in range(0, len(values), _WIDTH))


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", exc)
    return f"{sqlstate_of(exc) or type(orig).__name__}: {str(orig).strip().splitlines()[0][:500]}"


async def copy_rows(database: Database, rows: Sequence[EventRow]) -> None:
    """Store ``rows`` in one transaction: a COPY straight into the table, or, when some are
    stored already, COPY into a staging table and one INSERT … SELECT … ON CONFLICT DO NOTHING.

    For the writers that drain a buffer into PostgreSQL (on SQLite, the direct buffer's insert).
    Raises whatever the store raised; :func:`store_batch` splits batches the store refuses.
    """
    if database.is_sqlite:
        values = sqlite_values(rows)
        await database.run_write(lambda conn: insert_sqlite_values(conn, [values]))
        return
    try:
        await _copy_straight(database, rows)
    except Exception as exc:
        if sqlstate_of(exc) != UNIQUE_VIOLATION:
            raise
        await _copy_through_staging(database, rows)


# A buffer hands an event over twice only after a writer died between the store's commit and its
# acknowledgement, or when a client sent it twice: rarely. So a batch is first COPied straight
# into the table, which refuses it whole if any id is there already; only then does it go through
# the staging table. Measured on a table of 5 M events (`keel bench firehose -s redis-drain-2m`,
# and COPY of 5,000-event batches alone): the staging table's write and read cost PostgreSQL
# about 3 µs an event of the 8 to 12 an event costs in all.
UNIQUE_VIOLATION = "23505"


async def _copy_straight(database: Database, rows: Sequence[EventRow]) -> None:
    async with database.write() as conn:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        # One statement, so atomic by itself: all the rows or, on a repeated id, none.
        await driver.copy_records_to_table("firehose_events", records=rows, columns=COLUMNS)


async def _copy_through_staging(database: Database, rows: Sequence[EventRow]) -> None:
    async with database.write() as conn:
        # Through SQLAlchemy first: that opens the transaction the COPY then joins. Straight on
        # the driver, each statement would commit on its own, and the staging rows (ON COMMIT
        # DELETE ROWS) would be gone before the INSERT read them.
        await conn.exec_driver_sql(_PG_STAGING)
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        await driver.copy_records_to_table("firehose_staging", records=rows, columns=COLUMNS)
        await conn.exec_driver_sql(_PG_FROM_STAGING)


async def dead_letter(database: Database, row: EventRow, reason: str) -> None:
    async with database.write() as conn:
        sql = _DEAD_LETTER_SQLITE if database.is_sqlite else _DEAD_LETTER_PG
        event_id: Any = row.event_id.bytes if database.is_sqlite else row.event_id
        await conn.exec_driver_sql(sql, (event_id, event_json(row), reason, now_us()))


async def store_batch(
    database: Database,
    rows: Sequence[EventRow],
    copy: Callable[[Database, Sequence[EventRow]], Awaitable[None]] = copy_rows,
) -> int:
    """Store ``rows``, dead-lettering those the store refuses; returns how many were refused.

    Each part commits on its own; that is safe because every insert is deduplicated, and the
    caller acknowledges the buffer only after this returns.
    """
    try:
        await copy(database, rows)
        return 0
    except Exception as exc:
        if not refused_for_its_data(exc):
            raise
        if len(rows) == 1:
            log.warning("event %s refused by the store: %s", rows[0].event_id, _reason(exc))
            await dead_letter(database, rows[0], _reason(exc))
            return 1
    half = len(rows) // 2
    return await store_batch(database, rows[:half], copy) + await store_batch(
        database, rows[half:], copy
    )
