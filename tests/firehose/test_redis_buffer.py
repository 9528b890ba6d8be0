"""The Redis Streams buffer on the shared Redis: exactly once into the store, Redis left empty,
the bound said out loud, a killed writer's entries taken over, durability reported honestly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis
from sqlalchemy.engine import make_url

from keel.core.database import Database
from keel.core.uuid7 import uuid7
from keel.firehose.app import create_app
from keel.firehose.buffers.base import StoreStatus
from keel.firehose.buffers.redis import RedisBuffer, durability
from keel.firehose.buffers.redis_writer import StreamKeys, StreamWriter, ensure_group
from keel.firehose.events import EventRow
from keel.firehose.settings import FirehoseSettings
from tests.firehose.redis_support import (
    drop_stream,
    events_with_ids,
    eventually,
    redis_settings,
    stream_state,
    unique_stream,
)
from tests.firehose.test_ingest import stored
from tests.support.live_server import free_port


@pytest.fixture
async def stream(redis_url: str) -> AsyncIterator[str]:
    name = unique_stream()
    yield name
    await drop_stream(redis_url, name)


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def firehose_settings(database_url: str, redis_url: str, stream: str) -> FirehoseSettings:
    """Overrides conftest's: the ``firehose`` client below runs on the Redis buffer."""
    return redis_settings(database_url, redis_url, stream)


def row(n: int = 0) -> EventRow:
    return EventRow(uuid7(), f"u{n}", "view", 1, 1, None, 2, f'{{"n": {n}}}')


async def all_stored_once(database: Database, ids: list[str]) -> bool:
    return set((await stored(database, *ids)).values()) == {1}


async def drained(client: aioredis.Redis, stream: str) -> bool:
    return await stream_state(client, stream) == {"entries": 0, "depth": 0, "pending": 0}


async def test_events_reach_the_store_once_and_redis_empties(
    firehose: httpx.AsyncClient, database: Database, raw_redis: aioredis.Redis, stream: str
) -> None:
    events = events_with_ids(300)
    singles = [firehose.post("/events", json=e) for e in events[:60]]
    batches = [firehose.post("/events/batch", json=events[i : i + 60]) for i in range(60, 300, 60)]
    retried = firehose.post("/events/batch", json=events[:30])  # a client retry: stored once
    replies = await asyncio.gather(*singles, *batches, retried)
    assert [r.status_code for r in replies] == [202] * len(replies)
    ids = [str(e["event_id"]) for e in events]
    await eventually(lambda: all_stored_once(database, ids), "every event stored")
    await eventually(lambda: drained(raw_redis, stream), "Redis to hold nothing of the buffer")
    health = (await firehose.get("/health")).json()
    assert health["buffer"]["kind"] == "redis"
    assert health["buffer"]["depth"] == 0
    assert health["buffer"]["consumers"] >= 1
    assert health["store"]["status"] == "ok"


async def test_one_group_commit_refuses_only_the_requests_that_do_not_fit(
    database: Database, redis_url: str, stream: str, raw_redis: aioredis.Redis
) -> None:
    """In one script call: 8 fit, 5 more would pass the bound of 10, the 2 after them fit."""
    settings = redis_settings(
        "sqlite://", redis_url, stream, buffer_max_events=10, flush_age_ms=60_000
    )
    buffer = RedisBuffer(database, settings)
    outcomes = await buffer._commit([[row() for _ in range(8)], [row()] * 5, [row(), row()]])
    await buffer.stop()
    assert outcomes[0] is None and outcomes[2] is None
    assert type(outcomes[1]).__name__ == "BufferFull"
    entries = await raw_redis.xrange(stream)
    assert len(entries) == 1  # one entry per group commit
    fields = entries[0][1]
    assert fields[b"n"] == b"10"
    assert len(msgspec.msgpack.decode(fields[b"rows"], type=list[EventRow])) == 10
    assert int(await raw_redis.get(f"{stream}:depth")) == 10


@pytest.mark.parametrize("sizes", [[15], [16], [9, 7], [40_000, 30_000]])
async def test_an_entry_decodes_whatever_its_size(
    database: Database, redis_url: str, stream: str, raw_redis: aioredis.Redis, sizes: list[int]
) -> None:
    """The script writes the msgpack array header itself: each size class must decode."""
    settings = redis_settings("sqlite://", redis_url, stream, flush_age_ms=60_000)
    buffer = RedisBuffer(database, settings)
    requests = [[row(i) for i in range(size)] for size in sizes]
    assert await buffer._commit(requests) == [None] * len(sizes)
    await buffer.stop()
    (_, fields), *_ = await raw_redis.xrange(stream)
    decoded = msgspec.msgpack.decode(fields[b"rows"], type=list[EventRow])
    assert decoded == [r for rows in requests for r in rows]


@pytest.fixture
def bounded_settings(database_url: str, redis_url: str, stream: str) -> FirehoseSettings:
    """A bound of 10 events, and a writer that holds what it read for a minute."""
    return redis_settings(
        database_url, redis_url, stream, buffer_max_events=10, flush_age_ms=60_000
    )


async def test_past_its_bound_ingest_answers_buffer_full(
    bounded_settings: FirehoseSettings, make_key: Any, database: Database
) -> None:
    app = create_app(bounded_settings)
    async with app.router.lifespan_context(app):
        key = await make_key()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://firehose.test",
            headers={"Authorization": f"Bearer {key}"},
        ) as client:
            first = events_with_ids(8)
            assert (await client.post("/events/batch", json=first)).status_code == 202
            refused = await client.post("/events/batch", json=events_with_ids(8))
            assert refused.status_code == 503
            assert refused.json()["code"] == "buffer_full"
            assert refused.headers["retry-after"] == "1"
            smaller = events_with_ids(2)
            assert (await client.post("/events/batch", json=smaller)).status_code == 202
            single = await client.post("/events", json=events_with_ids(1)[0])
            assert single.json()["code"] == "buffer_full"
            health = (await client.get("/health")).json()
            assert health["buffer"]["depth"] == 10
            assert health["buffer"]["oldest_age_seconds"] is not None
    # Stopping flushes what the writer held: everything accepted is stored.
    ids = [str(e["event_id"]) for e in first + smaller]
    assert await all_stored_once(database, ids)


async def test_a_killed_writers_entries_are_taken_over_and_stored_once(
    database_url: str,
    redis_url: str,
    stream: str,
    raw_redis: aioredis.Redis,
    database: Database,
) -> None:
    """Writer A reads the entries and dies before acknowledging; writer B claims and stores them."""
    slow = redis_settings(database_url, redis_url, stream, flush_age_ms=60_000)
    a = RedisBuffer(database, slow)
    await a.start()
    batches = [[row(i) for i in range(25)] for _ in range(4)]
    await asyncio.gather(*(a.append(rows) for rows in batches))

    async def a_holds_all() -> bool:
        return a._writer.held == 100

    await eventually(a_holds_all, "writer A to read every entry")
    assert a._writer_task is not None
    a._writer_task.cancel()  # killed mid-batch: read, not stored, not acknowledged
    await asyncio.wait([a._writer_task])
    assert (await stream_state(raw_redis, stream))["pending"] >= 1

    b = RedisBuffer(database, redis_settings(database_url, redis_url, stream))
    await b.start()
    try:
        ids = [str(r.event_id) for rows in batches for r in rows]
        await eventually(lambda: all_stored_once(database, ids), "B to store A's entries")
        await eventually(lambda: drained(raw_redis, stream), "Redis to empty")

        async def a_removed() -> bool:
            consumers = await raw_redis.xinfo_consumers(stream, "writers")
            return a._writer.consumer.encode() not in {c["name"] for c in consumers}

        await eventually(a_removed, "the dead consumer A to be removed")
    finally:
        await b.stop()
        await a.stop()


async def test_health_says_what_a_202_survives_on_the_shared_redis(
    firehose: httpx.AsyncClient, raw_redis: aioredis.Redis
) -> None:
    config = await raw_redis.config_get("appendonly")
    if config["appendonly"] != "no" or (await raw_redis.config_get("save"))["save"]:
        pytest.skip("the shared Redis here is expected to keep nothing on disk")
    health = (await firehose.get("/health")).json()
    assert health["buffer"]["durability"] == "nothing: a Redis restart loses the buffer"
    assert health["buffer"]["persistence"]["appendonly"] == "no"


async def test_production_without_aof_refuses_to_start(
    database_url: str, redis_url: str, stream: str
) -> None:
    settings = redis_settings(database_url, redis_url, stream, env="production")
    app = create_app(settings)
    with pytest.raises(RuntimeError, match="appendonly") as refused:
        async with app.router.lifespan_context(app):
            pass
    assert "KEEL_ENV=production" in str(refused.value)


def test_the_redis_buffer_needs_a_redis_url(database: Database) -> None:
    with pytest.raises(ValueError, match="KEEL_REDIS_URL"):
        RedisBuffer(database, FirehoseSettings(database_url="sqlite://", buffer="redis"))


async def test_a_store_down_keeps_entries_until_it_returns(
    redis_url: str,
    stream: str,
    raw_redis: aioredis.Redis,
    database: Database,
    database_url: str,
    tmp_path: Path,
) -> None:
    """Flushing into a store that refuses (no tables yet) fails and retries; nothing is acked."""
    settings = redis_settings(f"sqlite:///{tmp_path / 'unmigrated.db'}", redis_url, stream)
    broken = Database.from_settings(settings)
    buffer = RedisBuffer(broken, settings)
    await buffer.start()
    try:
        rows = [row(i) for i in range(5)]
        await buffer.append(rows)

        async def store_down() -> bool:
            return (await buffer.health()).store.status == "down"

        await eventually(store_down, "the writer to see the store down")
        assert (await stream_state(raw_redis, stream))["depth"] == 5
    finally:
        await buffer.stop()
        await broken.dispose()
    assert (await stream_state(raw_redis, stream))["pending"] == 1  # left for the next writer
    fixed = RedisBuffer(database, redis_settings(database_url, redis_url, stream))
    await fixed.start()
    try:
        ids = [str(r.event_id) for r in rows]
        await eventually(lambda: all_stored_once(database, ids), "the next writer to store them")
        await eventually(lambda: drained(raw_redis, stream), "Redis to empty")
    finally:
        await fixed.stop()


@pytest.mark.parametrize(
    ("appendonly", "appendfsync", "save", "survives"),
    [
        ("yes", "always", "", "a Redis crash"),
        ("yes", "everysec", "3600 1", "a Redis crash, except up to the last second on power loss"),
        ("no", "everysec", "", "nothing: a Redis restart loses the buffer"),
        ("no", "everysec", "3600 1 300 100", "only what the last RDB snapshot holds"),
        (None, None, None, "unknown"),
    ],
)
def test_durability_in_words(
    appendonly: str | None, appendfsync: str | None, save: str | None, survives: str
) -> None:
    assert durability(appendonly, appendfsync, save).startswith(survives)


async def test_the_next_batch_is_read_while_the_store_takes_one_and_flushed_on_stop(
    database_url: str, redis_url: str, stream: str, raw_redis: aioredis.Redis, database: Database
) -> None:
    """Read-ahead overlaps the writer's Redis reads and decoding with the store's work; a batch
    read ahead is stored before the writer stops, not left pending for a takeover."""
    settings = redis_settings(database_url, redis_url, stream, flush_size=100)
    buffer = RedisBuffer(database, settings)
    batches = [[row(i) for i in range(100)] for _ in range(3)]
    for rows in batches:  # three entries: three flush batches
        assert await buffer._commit([rows]) == [None]
    writer = StreamWriter(buffer._client, database, settings, StoreStatus())
    await ensure_group(buffer._client, StreamKeys.of(settings), 1.0)
    try:
        await writer._fill()
        await writer._flush()
        assert writer.held == 100  # the second batch, read while the first was stored
        assert await stream_state(raw_redis, stream) == {"entries": 2, "depth": 200, "pending": 1}
        writer.stop()
        await writer.run()  # flushes the batch read ahead, reads no more
        assert await stream_state(raw_redis, stream) == {"entries": 1, "depth": 100, "pending": 0}
        ids = [str(r.event_id) for rows in batches[:2] for r in rows]
        assert await all_stored_once(database, ids)
        unread = await stored(database, *(str(r.event_id) for r in batches[2]))
        assert set(unread.values()) == {0}
    finally:
        await buffer.stop()


async def _forward(port: int, host: str, to: int) -> asyncio.Server:
    """A plain TCP forwarder on ``port`` to ``host:to``: the store's route, up while it runs."""

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(host, to)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        with contextlib.suppress(OSError, ConnectionError):
            await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    return await asyncio.start_server(handle, "127.0.0.1", port, reuse_address=True)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_batch_read_ahead_and_taken_over_is_stored_and_counted_once(
    database_url: str, redis_url: str, stream: str, raw_redis: aioredis.Redis, database: Database
) -> None:
    """Writer A's store is unreachable: it holds one batch and reads the next ahead, and both
    lie idle until writer B takes them over, stores them and acknowledges them. When A's store
    comes back, A stores both again (the store dedupes) and acknowledges them: the depth counter
    must not fall twice, nor any entry stay pending."""
    url = make_url(database_url)
    port = free_port()
    through = url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    a_settings = redis_settings(through, redis_url, stream, flush_size=100)
    a_store = Database.from_settings(a_settings)
    a = RedisBuffer(a_store, a_settings)
    batches = [[row(i) for i in range(100)] for _ in range(4)]
    for rows in batches:  # four entries, in before A reads: it reads one and the next ahead
        assert await a._commit([rows]) == [None]
    ids = [str(r.event_id) for rows in batches for r in rows]
    await a.start()
    b: RedisBuffer | None = None
    route: asyncio.Server | None = None
    try:

        async def a_holds_two_batches() -> bool:
            return a._writer.held == 200

        await eventually(a_holds_two_batches, "A to hold a batch and read the next ahead")
        b = RedisBuffer(database, redis_settings(database_url, redis_url, stream))
        await b.start()
        await eventually(lambda: all_stored_once(database, ids), "B to store all, A's included")
        await eventually(lambda: drained(raw_redis, stream), "Redis to empty")
        assert a._writer.held == 200  # A still has them, unstored, unacknowledged

        route = await _forward(port, url.host or "127.0.0.1", url.port or 5432)

        async def a_done() -> bool:
            return a._writer.held == 0

        await eventually(a_done, "A to store and acknowledge what it held")
        assert await stream_state(raw_redis, stream) == {"entries": 0, "depth": 0, "pending": 0}
        assert await all_stored_once(database, ids)
    finally:
        if b is not None:
            await b.stop()
        await a.stop()
        await a_store.dispose()
        if route is not None:
            route.close()
            await route.wait_closed()
