"""Ingest: one event, batches (JSON, NDJSON, gzip), deduplication, clock skew, reading back."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from sqlalchemy import func, select

from keel.core.database import Database
from keel.firehose.tables import events

NOW = time.time()
Drained = Callable[[], Awaitable[None]]


def event(user: str = "u1", **fields: object) -> dict[str, object]:
    return {"user_id": user, "name": "click", "timestamp": time.time(), **fields}


async def stored(database: Database, *ids: str) -> dict[str, int]:
    """How many rows the store holds for each event id (read from the database, not replies)."""
    wanted = [uuid.UUID(i) for i in ids]
    values = [w.bytes for w in wanted] if database.is_sqlite else wanted
    async with database.read() as conn:
        rows = (
            await conn.execute(
                select(events.c.event_id, func.count())
                .where(events.c.event_id.in_(values))
                .group_by(events.c.event_id)
            )
        ).all()
    counts = {str(uuid.UUID(bytes=r[0]) if isinstance(r[0], bytes) else r[0]): r[1] for r in rows}
    return {i: counts.get(i, 0) for i in ids}


async def test_one_event_is_stored_with_a_uuid7_id(
    firehose: httpx.AsyncClient, database: Database, drained: Drained
) -> None:
    reply = await firehose.post("/events", json=event(metadata={"page": "/home"}))
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert body["status"] == "accepted"
    assert uuid.UUID(body["event_id"]).version == 7
    await drained()
    assert await stored(database, body["event_id"]) == {body["event_id"]: 1}


async def test_a_retried_event_is_stored_once(
    firehose: httpx.AsyncClient, database: Database, drained: Drained
) -> None:
    event_id = str(uuid.uuid4())  # random ids dedupe too, only slower
    for _ in range(3):
        reply = await firehose.post("/events", json=event(event_id=event_id))
        assert reply.status_code == 202
        assert reply.json()["event_id"] == event_id
    batch = [event(event_id=event_id), event(event_id=event_id)]
    assert (await firehose.post("/events/batch", json=batch)).status_code == 202
    await drained()
    assert await stored(database, event_id) == {event_id: 1}


async def test_a_batch_stores_the_valid_events_and_names_the_rest(
    firehose: httpx.AsyncClient, database: Database, drained: Drained
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(4)]
    batch = [
        event(event_id=ids[0]),
        {"user_id": 5, "timestamp": "x", "event_id": ids[1]},  # wrong type
        event(event_id=ids[2], timestamp=1.0),  # 1970: out of range
        event(event_id=ids[3], metadata={"k": [1, 2]}),
    ]
    reply = await firehose.post("/events/batch", json=batch)
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert body["accepted"] == 2
    assert [(r["index"], r["code"]) for r in body["rejected"]] == [
        (1, "validation_error"),
        (2, "timestamp_out_of_range"),
    ]
    await drained()
    assert await stored(database, *ids) == {ids[0]: 1, ids[1]: 0, ids[2]: 0, ids[3]: 1}


async def test_ndjson_gzip_batch(
    firehose: httpx.AsyncClient, database: Database, drained: Drained
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    lines = [json.dumps(event(event_id=i)) for i in ids[:2]] + [
        "{not json",
        "",
        json.dumps(event(event_id=ids[2])),
    ]
    reply = await firehose.post(
        "/events/batch",
        content=gzip.compress("\n".join(lines).encode()),
        headers={"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"},
    )
    assert reply.status_code == 202, reply.text
    assert reply.json()["accepted"] == 3
    assert [(r["index"], r["code"]) for r in reply.json()["rejected"]] == [(2, "invalid_json")]
    await drained()
    assert set((await stored(database, *ids)).values()) == {1}


async def test_sent_at_corrects_the_clients_clock_skew(
    firehose: httpx.AsyncClient, drained: Drained
) -> None:
    skew = 3600.0  # the client's clock runs an hour fast
    happened = time.time() - 10
    event_id = str(uuid.uuid4())
    body = event(
        user=f"skew-{event_id}",
        event_id=event_id,
        timestamp=happened + skew,
        sent_at=time.time() + skew,
    )
    assert (await firehose.post("/events", json=body)).status_code == 202
    await drained()
    page = (await firehose.get("/events", params={"user_id": f"skew-{event_id}"})).json()
    [stored_event] = page["items"]
    corrected = _epoch(stored_event["timestamp"])
    assert abs(corrected - happened) < 5  # the hour is taken out (5 s covers the request)
    assert abs(_epoch(stored_event["original_timestamp"]) - (happened + skew)) < 0.001
    assert stored_event["sent_at"] is not None and stored_event["received_at"]


def _epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_reading_back_filters_and_pages(
    firehose: httpx.AsyncClient, drained: Drained
) -> None:
    user = f"reader-{uuid.uuid4()}"
    batch = [
        event(user=user, name="view" if i % 2 else "click", metadata={"i": i}) for i in range(7)
    ]
    assert (await firehose.post("/events/batch", json=batch)).status_code == 202
    await drained()
    seen: list[int] = []
    cursor = None
    while True:
        params = {"user_id": user, "name": "click", "limit": 2} | (
            {"cursor": cursor} if cursor else {}
        )
        page = (await firehose.get("/events", params=params)).json()
        seen += [item["metadata"]["i"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [6, 4, 2, 0]  # newest first
    stats = (await firehose.get("/stats", params={"window": 600})).json()
    assert stats["total"] >= 7
    assert any(n["name"] == "view" and n["count"] >= 3 for n in stats["per_name"]), stats


async def test_health_shows_the_buffer(firehose: httpx.AsyncClient) -> None:
    health = (await firehose.get("/health")).json()
    assert health["status"] == "ok"
    assert health["buffer"]["kind"] in ("direct", "spool")
    assert health["dead_letters"] == 0 or isinstance(health["dead_letters"], int)
    assert health["store"]["status"] == "ok"


async def test_events_waiting_in_memory_are_bounded(firehose_app: Any, make_key: Any) -> None:
    """Past ingest_queue_max_events waiting for their commit, 503 overloaded, nothing accepted."""
    firehose_app.state.platform.services["buffer"].max_waiting = 10
    key = await make_key()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=firehose_app),
        base_url="http://firehose.test",
        headers={"Authorization": f"Bearer {key}"},
    ) as client:
        replies = await asyncio.gather(
            *(client.post("/events/batch", json=[event() for _ in range(10)]) for _ in range(5))
        )
    codes = sorted((r.status_code, r.json().get("code", "")) for r in replies)
    assert codes[0] == (202, "") and (503, "overloaded") in codes, codes
    assert all(r.headers["retry-after"] == "1" for r in replies if r.status_code == 503)
