"""Bad input: a 4xx problem with a stable code, and nothing stored, on both ingest routes."""

from __future__ import annotations

import gzip
import json
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from keel.core.database import Database
from keel.firehose.tables import events

GOOD = {"user_id": "u1", "name": "click", "timestamp": time.time()}
JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}
DEEP = b"[" * 10_000 + b"]" * 10_000


async def stored_count(database: Database) -> int:
    async with database.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(events))).scalar_one())


def body(**fields: Any) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


def gzip_bomb() -> bytes:
    """1 MiB of gzip that inflates to 64 MiB of zeros (inside a JSON string)."""
    return gzip.compress(b'{"user_id":"u","timestamp":1e9,"name":"' + b"0" * (64 << 20) + b'"}', 9)


SINGLE = [
    ("malformed json", b'{"user_id": "u1", "timestamp": ', JSON, 400, "invalid_json"),
    (
        "invalid utf-8",
        b'{"user_id": "\xff\xfe", "timestamp": 1700000000}',
        JSON,
        400,
        "invalid_utf8",
    ),
    ("wrong type", body(user_id=["a"]), JSON, 422, "validation_error"),
    ("missing field", json.dumps({"user_id": "u"}).encode(), JSON, 422, "validation_error"),
    ("bad event_id", body(event_id="not-a-uuid"), JSON, 422, "validation_error"),
    ("metadata not an object", body(metadata=[1, 2]), JSON, 422, "validation_error"),
    ("metadata over 32 KiB", body(metadata={"x": "y" * 40_000}), JSON, 413, "event_too_large"),
    ("body over 1 MiB", body(metadata={"x": "y" * (1 << 20)}), JSON, 413, "payload_too_large"),
    (
        "nested 10,000 deep",
        b'{"user_id":"u","timestamp":1e9,"metadata":{"a":' + DEEP + b"}}",
        JSON,
        400,
        "too_deep",
    ),
    ("timestamp 1970", body(timestamp=1.0), JSON, 422, "timestamp_out_of_range"),
    ("timestamp 2200", body(timestamp="2200-01-01T00:00:00Z"), JSON, 422, "timestamp_out_of_range"),
    ("timestamp huge", b'{"user_id":"u","timestamp":1e400}', JSON, 422, "timestamp_out_of_range"),
    (
        "skew past range",
        body(timestamp=1_000_000_000, sent_at=4_000_000_000),
        JSON,
        422,
        "timestamp_out_of_range",
    ),
    ("bad rfc 3339", body(timestamp="2026-13-45T00:00:00Z"), JSON, 422, "validation_error"),
    # PostgreSQL's text cannot hold NUL: refused at the door on every store, not dead-lettered.
    ("nul in user_id", body(user_id="a\x00b"), JSON, 422, "validation_error"),
    ("nul in name", body(name="\x00"), JSON, 422, "validation_error"),
    (
        "not json content type",
        body(),
        {"Content-Type": "text/plain"},
        415,
        "unsupported_media_type",
    ),
    ("empty body", b"", JSON, 400, "invalid_json"),
]


@pytest.mark.parametrize(
    ("case", "content", "headers", "status", "code"), SINGLE, ids=[c[0] for c in SINGLE]
)
async def test_bad_single_event(
    firehose: httpx.AsyncClient,
    database: Database,
    case: str,
    content: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    before = await stored_count(database)
    reply = await firehose.post("/events", content=content, headers=headers)
    assert (reply.status_code, reply.json()["code"]) == (status, code), reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    assert await stored_count(database) == before


async def test_gzip_bomb_and_unknown_encoding(
    firehose: httpx.AsyncClient, database: Database
) -> None:
    before = await stored_count(database)
    bomb = gzip_bomb()
    assert len(bomb) < 1 << 20
    for path in ("/events", "/events/batch"):
        reply = await firehose.post(
            path, content=bomb, headers={**JSON, "Content-Encoding": "gzip"}
        )
        assert (reply.status_code, reply.json()["code"]) == (413, "payload_too_large")
        reply = await firehose.post(
            path, content=body(), headers={**JSON, "Content-Encoding": "br"}
        )
        assert (reply.status_code, reply.json()["code"]) == (415, "unsupported_encoding")
        reply = await firehose.post(
            path, content=b"\x1f\x8bnot gzip", headers={**JSON, "Content-Encoding": "gzip"}
        )
        assert (reply.status_code, reply.json()["code"]) == (400, "bad_request")
    assert await stored_count(database) == before


BATCH = [
    ("malformed array", b'[{"user_id": "u1"', JSON, 400, "invalid_json"),
    ("not an array", body(), JSON, 422, "validation_error"),
    ("nested 10,000 deep", DEEP, JSON, 400, "too_deep"),
    ("1,001 events", json.dumps([GOOD] * 1001).encode(), JSON, 413, "too_many_events"),
    (
        "every event invalid",
        json.dumps([{"user_id": 1}, {"timestamp": 1}]).encode(),
        JSON,
        422,
        "invalid_events",
    ),
    ("every line invalid", b"{oops\n[1]\n", NDJSON, 422, "invalid_events"),
    ("empty array", b"[]", JSON, 422, "invalid_events"),
    (
        "over 1 MiB",
        json.dumps([{**GOOD, "metadata": {"x": "y" * 30_000}}] * 40).encode(),
        JSON,
        413,
        "payload_too_large",
    ),
]


@pytest.mark.parametrize(
    ("case", "content", "headers", "status", "code"), BATCH, ids=[c[0] for c in BATCH]
)
async def test_bad_batch(
    firehose: httpx.AsyncClient,
    database: Database,
    case: str,
    content: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    before = await stored_count(database)
    reply = await firehose.post("/events/batch", content=content, headers=headers)
    assert (reply.status_code, reply.json()["code"]) == (status, code), reply.text
    assert await stored_count(database) == before


async def test_invalid_utf8_in_one_event_of_a_batch_rejects_that_event(
    firehose: httpx.AsyncClient, database: Database, drained: Any
) -> None:
    before = await stored_count(database)
    content = b"[" + body() + b',{"user_id":"\xff","timestamp":1700000000}]'
    reply = await firehose.post("/events/batch", content=content, headers=JSON)
    assert reply.status_code == 202, reply.text
    assert reply.json()["rejected"] == [
        {"index": 1, "code": "invalid_utf8", "detail": reply.json()["rejected"][0]["detail"]}
    ]
    await drained()
    assert await stored_count(database) == before + 1


async def test_nul_in_one_event_of_a_batch_rejects_that_event(
    firehose: httpx.AsyncClient, database: Database, drained: Any
) -> None:
    before = await stored_count(database)
    batch = [GOOD, {**GOOD, "user_id": "nul\x00"}, {**GOOD, "name": "a\x00"}, GOOD]
    reply = await firehose.post("/events/batch", content=json.dumps(batch), headers=JSON)
    assert reply.status_code == 202, reply.text
    assert [(r["index"], r["code"]) for r in reply.json()["rejected"]] == [
        (1, "validation_error"),
        (2, "validation_error"),
    ]
    assert "NUL" in reply.json()["rejected"][0]["detail"]
    await drained()
    assert await stored_count(database) == before + 2


async def test_ingest_needs_a_write_key(firehose_app: Any, make_key: Any) -> None:
    from keel.core.auth import Scope

    read_key = await make_key(Scope.READ)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=firehose_app), base_url="http://t"
    ) as c:
        assert (await c.post("/events", json=GOOD)).status_code == 401
        reply = await c.post("/events", json=GOOD, headers={"Authorization": f"Bearer {read_key}"})
        assert (reply.status_code, reply.json()["code"]) == (403, "forbidden")
        reply = await c.get("/events", headers={"Authorization": f"Bearer {read_key}"})
        assert reply.status_code == 200
