"""A Redis of the test's own, stopped, frozen and killed under the Redis buffer (never the shared).

Redis down: ingest says 503 ``buffer_unavailable``, never a 202 it cannot keep, and takes events
again once Redis is back. Redis with AOF (``appendfsync always``) killed with SIGKILL under load:
after it restarts on the same directory, every event that got a 202 is stored exactly once.
A PostgreSQL of the test's own stopped hard: ingest carries on into Redis and drains afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from keel.core.database import Database, create_engine
from keel.core.migrate import upgrade
from keel.firehose.app import create_app
from keel.firehose.buffers.redis import RedisBuffer
from keel.firehose.registration import MIGRATIONS as FIREHOSE_MIGRATIONS
from tests.firehose.redis_support import (
    drop_stream,
    events_with_ids,
    eventually,
    redis_settings,
    stream_state,
    unique_stream,
)
from tests.firehose.test_ingest import stored
from tests.support.ledger import create_key
from tests.support.own_postgres import OwnPostgres, postgres_bin
from tests.support.redis_server import PrivateRedis

pytestmark = pytest.mark.slow

POSTERS = 16
KILL_AFTER = 1_500  # events acknowledged before Redis is killed


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    servers: list[PrivateRedis] = []

    def start(*, appendonly: bool = False) -> PrivateRedis:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        server = PrivateRedis(directory, appendonly=appendonly)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[Database]:
    database = Database(create_engine(postgres_url))
    yield database
    await database.dispose()


@asynccontextmanager
async def firehose_on(app: Any, key: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app's lifespan (buffer and writer started) and a client of it in-process."""
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://firehose.test",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30.0,
        ) as client,
    ):
        yield client


async def all_stored_once(database: Database, ids: list[str]) -> bool:
    return set((await stored(database, *ids)).values()) == {1}


async def test_redis_down_is_503_never_202_and_back_is_202(
    private_redis: Callable[..., PrivateRedis], postgres_url: str, store: Database
) -> None:
    redis = private_redis()
    settings = redis_settings(postgres_url, redis.url, unique_stream(), redis_timeout_seconds=0.5)
    key = await create_key(postgres_url)
    async with firehose_on(create_app(settings), key) as client:
        before = events_with_ids(1)[0]
        assert (await client.post("/events", json=before)).status_code == 202

        redis.stop()
        for event in events_with_ids(5):
            reply = await client.post("/events", json=event)
            assert reply.status_code == 503, reply.text
            assert reply.json()["code"] == "buffer_unavailable"
            assert reply.headers["retry-after"] == "1"
        health = (await client.get("/health")).json()
        assert health["buffer"]["redis"].startswith("unavailable")

        redis.start()  # empty: this one keeps nothing on disk
        after = events_with_ids(1)[0]

        async def accepted_again() -> bool:
            return (await client.post("/events", json=after)).status_code == 202

        await eventually(accepted_again, "ingest to answer 202 once Redis is back")
        ids = [str(before["event_id"]), str(after["event_id"])]
        await eventually(lambda: all_stored_once(store, ids), "both events stored once")

        redis.freeze()  # accepts connections, answers nothing: a stalled Redis
        try:
            reply = await client.post("/events", json=events_with_ids(1)[0])
            assert (reply.status_code, reply.json()["code"]) in {
                (502, "outcome_unknown"),  # sent, never answered: it may be in
                (503, "buffer_unavailable"),
            }
        finally:
            redis.thaw()


@dataclass
class Load:
    """Every event id that got a 202, and every answer that was not one."""

    kill_after: int
    acknowledged: list[str] = field(default_factory=list)
    other: list[tuple[int, str]] = field(default_factory=list)
    enough: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def poster(self, client: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            batch = events_with_ids(10)
            reply = await client.post("/events/batch", json=batch)
            if reply.status_code == 202:
                self.acknowledged += [str(e["event_id"]) for e in batch]
                if len(self.acknowledged) >= self.kill_after:
                    self.enough.set()
            else:
                self.other.append((reply.status_code, reply.json()["code"]))
                await asyncio.sleep(0.01)  # Redis is down: do not spin


async def test_a_redis_with_aof_killed_under_load_keeps_every_202(
    private_redis: Callable[..., PrivateRedis], postgres_url: str, store: Database
) -> None:
    """Ingest only (its writer stopped, so no event is stored from a writer's memory): every
    202'd event must come back from the replayed AOF, and then be stored once."""
    redis = private_redis(appendonly=True)
    stream = unique_stream()
    settings = redis_settings(postgres_url, redis.url, stream, redis_timeout_seconds=0.5)
    key = await create_key(postgres_url)
    load = Load(KILL_AFTER)
    app = create_app(settings)
    async with firehose_on(app, key) as client:
        health = (await client.get("/health")).json()
        assert health["buffer"]["durability"] == "a Redis crash"
        buffer: Any = app.state.platform.services["buffer"]
        buffer._writer.stop()
        await asyncio.wait([buffer._writer_task])

        posters = [asyncio.create_task(load.poster(client)) for _ in range(POSTERS)]
        await asyncio.wait_for(load.enough.wait(), timeout=120)
        redis.kill()  # SIGKILL: only what was fsynced survives

        async def refused() -> bool:
            return bool(load.other)

        await eventually(refused, "the load to meet the dead Redis")
        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*posters), timeout=60)
        assert {code for _, code in load.other} <= {"buffer_unavailable", "outcome_unknown"}

    redis.start()  # same directory: the AOF is replayed
    raw = aioredis.from_url(redis.url)
    try:
        # Nothing was stored yet: the replayed Redis holds every 202'd event (and perhaps some
        # whose outcome was unknown).
        assert await store_count(store, load.acknowledged) == 0
        state = await stream_state(raw, stream)
        assert state["depth"] >= len(load.acknowledged)
        writer = RedisBuffer(store, settings)
        await writer.start()
        try:
            ids = load.acknowledged
            await eventually(lambda: all_stored_once(store, ids), "every 202'd event stored", 60)
            await eventually(lambda: _drained(raw, stream), "Redis to hold nothing", 30)
        finally:
            await writer.stop()
    finally:
        await raw.aclose()


async def store_count(database: Database, ids: list[str]) -> int:
    return sum((await stored(database, *ids)).values())


async def _drained(client: aioredis.Redis, stream: str) -> bool:
    return await stream_state(client, stream) == {"entries": 0, "depth": 0, "pending": 0}


async def test_a_redis_that_refuses_config_is_read_through_info(
    private_redis: Callable[..., PrivateRedis], postgres_url: str, store: Database
) -> None:
    """Managed Redis often refuses CONFIG: AOF is then read from INFO, and production starts."""
    redis = private_redis(appendonly=True)
    admin = aioredis.from_url(redis.url)
    try:
        await admin.execute_command(
            "ACL", "SETUSER", "keel", "on", ">secret", "~*", "&*", "+@all", "-config"
        )
    finally:
        await admin.aclose()
    url = f"redis://keel:secret@127.0.0.1:{redis.port}/0"
    settings = redis_settings(postgres_url, url, unique_stream(), env="production")
    buffer = RedisBuffer(store, settings)
    await buffer.start()
    try:
        health = await buffer.health()
    finally:
        await buffer.stop()
    assert health.durability == "a Redis crash (AOF; appendfsync unknown)"
    assert health.extra["persistence"] == {
        "appendonly": "yes",
        "appendfsync": None,
        "save": None,
        "maxmemory-policy": "noeviction",  # from INFO memory
    }


@pytest.fixture
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql")
    server = OwnPostgres(bin_dir).init()
    try:
        server.start()
        await upgrade(server.url, [FIREHOSE_MIGRATIONS])
        yield server
    finally:
        server.destroy()


async def test_the_store_down_keeps_taking_events_into_redis_then_drains(
    redis_url: str, own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    """PostgreSQL stopped hard: 202s continue into Redis, /health shows the store down and the
    buffer growing; started again, the buffer drains by itself with every event stored once."""
    stream = unique_stream()
    settings = redis_settings(own_postgres.url, redis_url, stream)
    key = await create_key(own_postgres.url)
    raw = aioredis.from_url(redis_url)
    accepted: list[str] = []
    try:
        async with firehose_on(create_app(settings), key) as client:

            async def send(count: int) -> None:
                batch = events_with_ids(count)
                reply = await client.post("/events/batch", json=batch)
                assert reply.status_code == 202, reply.text
                accepted.extend(str(e["event_id"]) for e in batch)

            await send(20)  # the key is now known to the process (its cache outlives the outage)
            await asyncio.to_thread(own_postgres.stop_hard)
            for _ in range(10):
                await send(20)

            async def store_down_and_buffer_growing() -> bool:
                health = (await client.get("/health")).json()
                return health["store"]["status"] == "down" and health["buffer"]["depth"] >= 180

            await eventually(store_down_and_buffer_growing, "/health to show the outage")
            await asyncio.to_thread(own_postgres.start)

            async def drained() -> bool:
                state = await stream_state(raw, stream)
                return state == {"entries": 0, "depth": 0, "pending": 0}

            await eventually(drained, "the buffer to drain once the store is back", 60)
            health = (await client.get("/health")).json()
            assert health["store"]["status"] == "ok"
        database = Database(create_engine(own_postgres.url))
        try:
            assert set((await stored(database, *accepted)).values()) == {1}
        finally:
            await database.dispose()
    finally:
        await drop_stream(redis_url, stream)
        await raw.aclose()
