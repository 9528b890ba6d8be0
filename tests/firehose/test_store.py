"""copy_rows, the writers' way into PostgreSQL: a batch goes straight into the table by COPY,
and through the staging table's ON CONFLICT only when some of it is stored already."""

from __future__ import annotations

import pytest

from keel.core.database import Database
from keel.core.uuid7 import uuid7
from keel.firehose.events import EventRow, now_us
from keel.firehose.store import copy_rows
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
