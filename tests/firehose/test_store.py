"""copy_rows, the writers' way into PostgreSQL: a batch goes straight into the table by COPY,
and through the staging table's ON CONFLICT only when some of it is stored already; and the
direct buffer's group commit on SQLite, 100 rows an INSERT."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from keel.core.database import Database
from keel.core.uuid7 import uuid7
from keel.firehose.events import EventRow, now_us
from keel.firehose.store import copy_rows, insert_sqlite_values, sqlite_values
from keel.firehose.tables import events
from tests.firehose.test_ingest import stored


def _rows(count: int) -> list[EventRow]:
    at = now_us()
    return [EventRow(uuid7(), f"u{i}", "view", at, at, None, at, '{"i": 1}') for i in range(count)]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_batch_holding_stored_and_repeated_events_stores_each_once(
    database: Database,
) -> None:
    first = _rows(200)
    await copy_rows(database, first)  # nothing stored yet: COPY straight into the table
    fresh = _rows(200)
    # A writer's redelivery (50 stored already) and a client's retry within one batch.
    again = [*first[:50], *fresh, fresh[7]]
    await copy_rows(database, again)
    ids = [str(r.event_id) for r in (*first, *fresh)]
    counts = await stored(database, *ids)
    assert len(counts) == 400 and set(counts.values()) == {1}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_sqlite_group_commit_stores_every_event_once_in_arrival_order(
    database: Database,
) -> None:
    """SQLite's group commit inserts 100 rows a statement: every request size around that cut,
    repeats across requests and inside one statement. Seq follows the order the requests were
    submitted in, and of an id sent twice the first copy is kept."""
    sizes = [1, 99, 100, 101, 250, 1, 1, 3, 500, 44]  # 1,100 rows: the next starts a statement
    requests = [_rows(size) for size in sizes]
    fresh = _rows(40)
    # A client's retry of stored events (changed, to tell the copies apart), and new ones, one
    # of them twice within the statement of rows 1,100 to 1,199 (at 1,100 and 1,165).
    again = [row._replace(user_id="retried") for row in (*requests[4][:60], requests[2][0])]
    requests.append([fresh[3]._replace(user_id="first"), *again, *fresh])
    assert sum(sizes) % 100 == 0 and len(requests[-1]) > 100
    await database.run_write(
        lambda conn: insert_sqlite_values(conn, [sqlite_values(rows) for rows in requests])
    )
    first_copies: dict[uuid.UUID, EventRow] = {}
    for rows in requests:
        for row in rows:
            first_copies.setdefault(row.event_id, row)
    stored = await _stored_rows(database)
    assert stored == first_copies  # each id once, its first copy, and nothing else
    seq_of = await _seqs(database)
    assert sorted(first_copies, key=seq_of.__getitem__) == list(first_copies)  # arrival order


async def _seqs(database: Database) -> dict[uuid.UUID, int]:
    async with database.read() as conn:
        found = await conn.execute(select(events.c.event_id, events.c.seq))
        return {uuid.UUID(bytes=event_id): seq for event_id, seq in found}


async def _stored_rows(database: Database) -> dict[uuid.UUID, EventRow]:
    columns = [getattr(events.c, name) for name in EventRow._fields]
    async with database.read() as conn:
        found = (await conn.execute(select(*columns))).all()
    return {uuid.UUID(bytes=row[0]): EventRow(uuid.UUID(bytes=row[0]), *row[1:]) for row in found}
