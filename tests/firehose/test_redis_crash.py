"""``kill -9`` a two-worker firehose on the Redis buffer under load; every 202 is stored once.

The writers hold what they read for a few seconds before storing it, so the kill lands while they
hold entries read and not acknowledged (writers killed mid-batch). The restarted server's writers
must take those over from the dead consumers after ``claim_idle_seconds``, store every event that
got a 202 exactly once, leave Redis empty and remove the dead consumers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from keel.core.database import Database, create_engine
from tests.firehose.redis_support import (
    drop_stream,
    events_with_ids,
    eventually,
    stream_state,
    unique_stream,
)
from tests.firehose.test_ingest import stored
from tests.support.ledger import create_key
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.slow

POSTERS = 32
KILL_AFTER = 1_000  # events acknowledged before the kill
GROUP = "keel-firehose-writers"  # the default consumer group


@dataclass
class Load:
    acknowledged: list[str] = field(default_factory=list)
    unanswered: int = 0
    enough: asyncio.Event = field(default_factory=asyncio.Event)

    async def poster(self, client: httpx.AsyncClient) -> None:
        while True:
            batch = events_with_ids(10)
            try:
                reply = await client.post("/events/batch", json=batch)
            except httpx.TransportError:  # the server died with this request in flight
                self.unanswered += 1
                return
            assert reply.status_code == 202, reply.text
            self.acknowledged += [str(e["event_id"]) for e in batch]
            if len(self.acknowledged) >= KILL_AFTER:
                self.enough.set()


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[Database]:
    database = Database(create_engine(postgres_url))
    yield database
    await database.dispose()


async def test_kill_9_under_load_stores_every_202_once(
    postgres_url: str, redis_url: str, store: Database, tmp_path: Path
) -> None:
    stream = unique_stream()
    key = await create_key(postgres_url)
    env = {
        "KEEL_FIREHOSE_BUFFER": "redis",
        "KEEL_REDIS_URL": redis_url,
        "KEEL_FIREHOSE_REDIS_STREAM": stream,
        "KEEL_FIREHOSE_CLAIM_IDLE_SECONDS": "1",
        "KEEL_FIREHOSE_FLUSH_AGE_MS": "3000",
        "KEEL_FIREHOSE_FLUSH_SIZE": "100000",
    }
    server = LiveServer(postgres_url, tmp_path, workers=2, service="firehose", env=env)
    raw = aioredis.from_url(redis_url)
    load = Load()
    try:
        server.start()
        async with httpx.AsyncClient(
            base_url=server.base_url,
            headers={"Authorization": f"Bearer {key}"},
            limits=httpx.Limits(max_connections=POSTERS),
            timeout=httpx.Timeout(30.0),
        ) as client:
            posters = [asyncio.create_task(load.poster(client)) for _ in range(POSTERS)]
            await asyncio.wait_for(load.enough.wait(), timeout=120)
            server.kill()  # SIGKILL to every process, requests and batches in flight
            await asyncio.wait_for(asyncio.gather(*posters), timeout=60)
        assert load.unanswered, "the kill should have cut requests off mid-flight"
        at_kill = await stream_state(raw, stream, GROUP)
        assert at_kill["pending"] > 0, "the writers should have died holding entries"
        dead = {c["name"] for c in await raw.xinfo_consumers(stream, GROUP)}

        server.start()  # new workers, new consumers; the dead ones' entries are taken over
        ids = load.acknowledged

        async def all_stored_once() -> bool:
            return set((await stored(store, *ids)).values()) == {1}

        async def drained() -> bool:
            state = await stream_state(raw, stream, GROUP)
            return state == {"entries": 0, "depth": 0, "pending": 0}

        async def dead_consumers_removed() -> bool:
            consumers = await raw.xinfo_consumers(stream, GROUP)
            return not dead & {c["name"] for c in consumers}

        await eventually(all_stored_once, "every 202'd event stored once", 90)
        await eventually(drained, "Redis to hold nothing of the buffer", 30)
        await eventually(dead_consumers_removed, "the dead consumers to be removed", 30)
    finally:
        server.stop()
        await drop_stream(redis_url, stream)
        await raw.aclose()
