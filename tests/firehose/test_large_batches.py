"""Large batches: the one-call decode of a well-formed batch, and COPY on PostgreSQL.

A batch of at least ``COPY_FROM_ROWS`` events reaches PostgreSQL through COPY and a staging
table, inside the group commit's transaction; what it stores must be what the INSERT path
stores: every event once, and an event the store refuses dead-lettered while the rest stand.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from sqlalchemy import func, select

from keel.core.database import Database
from keel.firehose.events import decode_batch, decode_event
from keel.firehose.store import COPY_FROM_ROWS
from keel.firehose.tables import dead_letters
from tests.firehose.test_ingest import NOW, event, stored


def test_a_well_formed_batch_decodes_as_its_events_do_one_by_one() -> None:
    items = [event(event_id=str(uuid.uuid4()), metadata={"n": n}) for n in range(5)]
    items[3]["timestamp"] = 1.0  # well-formed, but 1970: refused by the time rule, not the parser
    body = json.dumps(items).encode()
    rows, rejected = decode_batch(body, ndjson=False, received_us=1)
    assert [(r.index, r.code) for r in rejected] == [(3, "timestamp_out_of_range")]
    singles = [decode_event(json.dumps(item).encode(), 1) for i, item in enumerate(items) if i != 3]
    assert rows == singles


async def test_a_large_batch_is_stored_once_even_when_sent_twice(
    firehose: httpx.AsyncClient, database: Database, drained: Any
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(COPY_FROM_ROWS + 20)]
    batch = [event(user=f"u{n % 7}", event_id=i, metadata={"n": n}) for n, i in enumerate(ids)]
    for _ in range(2):  # a client's retry of the whole batch
        reply = await firehose.post("/events/batch", json=batch)
        assert reply.status_code == 202, reply.text
        assert reply.json() == {"accepted": len(ids), "rejected": []}
    await drained()
    assert set((await stored(database, *ids)).values()) == {1}


async def test_a_large_batch_dead_letters_what_the_store_refuses(
    firehose: httpx.AsyncClient, database: Database, drained: Any
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(COPY_FROM_ROWS + 5)]
    batch = [event(event_id=i, timestamp=NOW) for i in ids]
    batch[7]["metadata"] = {"text": "nul \u0000 inside"}  # JSONB refuses it; SQLite stores it
    reply = await firehose.post("/events/batch", json=batch)
    assert reply.status_code == 202, reply.text
    await drained()
    counts = await stored(database, *ids)
    nul = uuid.UUID(ids[7])
    async with database.read() as conn:
        refused = (
            await conn.execute(
                select(func.count()).where(
                    dead_letters.c.event_id == (nul.bytes if database.is_sqlite else nul)
                )
            )
        ).scalar_one()
    if database.is_sqlite:
        assert set(counts.values()) == {1} and refused == 0
    else:
        assert counts.pop(ids[7]) == 0 and set(counts.values()) == {1}
        assert refused == 1
