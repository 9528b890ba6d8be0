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
async def test_sqlite_group_commit_stores_every_request_whole_once_and_in_order(
    database: Database,
) -> None:
    """SQLite's group commit inserts 100 rows a statement and gathers the rows left over from
    each request: every size around that cut, and repeats across and within requests."""
    sizes = [1, 99, 100, 101, 250, 1, 1, 3, 500, 7]
    requests = [_rows(size) for size in sizes]
    retried = [*requests[4][:60], requests[2][0], *_rows(40)]  # a client's retry, and new ones
    requests.append(retried)
    await database.run_write(
        lambda conn: insert_sqlite_values(conn, [sqlite_values(rows) for rows in requests])
    )
    seq_of = await _seqs(database)
    every = {row.event_id for rows in requests for row in rows}
    assert len(seq_of) == len(every)  # each id once, and nothing else stored
    for rows in requests[:-1]:  # each request's events in its own order (seq rises)
        seqs = [seq_of[row.event_id] for row in rows]
        assert seqs == sorted(seqs)
    stored_rows = await _stored_rows(database)
    assert stored_rows == {row.event_id: row for rows in requests for row in rows}


async def _seqs(database: Database) -> dict[uuid.UUID, int]:
    async with database.read() as conn:
        found = await conn.execute(select(events.c.event_id, events.c.seq))
        return {uuid.UUID(bytes=event_id): seq for event_id, seq in found}


async def _stored_rows(database: Database) -> dict[uuid.UUID, EventRow]:
    columns = [getattr(events.c, name) for name in EventRow._fields]
    async with database.read() as conn:
        found = (await conn.execute(select(*columns))).all()
    return {uuid.UUID(bytes=row[0]): EventRow(uuid.UUID(bytes=row[0]), *row[1:]) for row in found}
