"""Review of the durable buffers (spool, Redis): each test is a finding, failing on main now.

Ranked in the review report; every test states the behaviour the buffer owes, on real SQLite,
PostgreSQL and Redis (the shared Redis on unique streams, or a private one for an outage).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from keel.core.database import Database, create_engine
from keel.core.errors import OutcomeUnknown
from keel.firehose.buffers.base import StoreStatus
from keel.firehose.buffers.redis import RedisBuffer
from keel.firehose.buffers.redis_writer import StreamKeys, StreamWriter, ensure_group
from keel.firehose.buffers.spool import SpoolBuffer
from keel.firehose.errors import BufferUnavailable
from keel.firehose.settings import FirehoseSettings
from tests.firehose.load import rows, store_counts, until
from tests.firehose.redis_support import drop_stream, redis_settings, stream_state, unique_stream
from tests.support.redis_server import PrivateRedis

on_postgres = pytest.mark.parametrize("backend", ["postgres"], indirect=True)
on_sqlite = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
_encode = msgspec.msgpack.Encoder(uuid_format="bytes").encode


def old_shape_batch(count: int) -> bytes:
    """A batch as an older keel (a 7-field row) would have left it: it no longer decodes."""
    return _encode([[r.event_id, r.user_id, r.name, 1, 1, None, 2] for r in rows(count)])


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


# -- 1. liveness: a row the spool cannot decode stops the host's drain for good ------------------


@on_postgres
async def test_spool_row_that_does_not_decode_does_not_stop_the_drain(
    database: Database, database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    buffer = SpoolBuffer(
        database,
        FirehoseSettings(database_url=database_url, spool_path=path, flush_size=50, flush_age_ms=5),
    )
    await buffer.start()
    try:
        with sqlite3.connect(path) as spool:  # a row left by an older keel, oldest in the file
            spool.execute(
                "INSERT INTO spool (received_at_us, events, rows) VALUES (1, 2, ?)",
                (old_shape_batch(2),),
            )
            spool.execute("UPDATE spool_depth SET events = events + 2")
        good = rows(3)
        await buffer.append(good)

        async def good_stored() -> bool:
            counts = await store_counts(database, [r.event_id for r in good])
            return set(counts.values()) == {1}

        # Expected: the bad row is set aside (dead-lettered / moved to a side table) and the
        # drain moves on. Found: every flush raises msgspec.ValidationError, forever, while
        # /health still says store "ok"; the 202'd events behind it never reach the store.
        await until(good_stored, 10, "events spooled behind an undecodable row to be stored")
    finally:
        await buffer.stop()


# -- 2. liveness + depth drift: a Redis entry that does not decode is never acknowledged ---------


@on_sqlite
async def test_redis_entry_that_does_not_decode_is_set_aside_and_counted_out(
    database: Database, database_url: str, redis_url: str, raw_redis: aioredis.Redis, stream: str
) -> None:
    settings = redis_settings(database_url, redis_url, stream)
    await raw_redis.xadd(stream, {"n": 2, "rows": old_shape_batch(2)})
    await raw_redis.incrby(f"{stream}:depth", 2)
    buffer = RedisBuffer(database, settings)
    await buffer.start()
    try:
        good = rows(3)
        await buffer.append(good)

        async def settled() -> bool:
            stored = set((await store_counts(database, [r.event_id for r in good])).values())
            state = await stream_state(raw_redis, stream)
            return stored == {1} and state == {"entries": 0, "depth": 0, "pending": 0}

        # Found: the entry stays pending for ever (taken over again every claim cycle, logged
        # each time), its 2 events stay in the depth counter (bound shrinks for good), and the
        # consumer holding it is never reaped.
        await until(settled, 10, "the undecodable entry to be set aside and counted out")
    finally:
        await buffer.stop()


# -- 3. memory: one XREADGROUP may hand a writer ~1000 entries of max_batch_events each --------


class RecordingWriter(StreamWriter):
    """The real writer; remembers the most events it held at once before a flush."""

    most_held = 0

    async def _flush(self) -> None:
        self.most_held = max(self.most_held, self.held)
        await super()._flush()


@on_sqlite
async def test_redis_writer_holds_about_flush_size_events_not_count_times_entry_size(
    database: Database, database_url: str, redis_url: str, raw_redis: aioredis.Redis, stream: str
) -> None:
    flush_size, big = 100, 1_000
    settings = redis_settings(
        database_url, redis_url, stream, flush_size=flush_size, flush_age_ms=2_000
    )
    # Quiet traffic first (one event per group commit: the running average falls to ~1 event an
    # entry), then a burst of batch requests (one entry per group commit of `big` events).
    for _ in range(100):
        await raw_redis.xadd(stream, {"n": 1, "rows": _encode(rows(1))})
    for _ in range(30):
        await raw_redis.xadd(stream, {"n": big, "rows": _encode(rows(big))})
    await raw_redis.set(f"{stream}:depth", 100 + 30 * big)
    await ensure_group(raw_redis, StreamKeys.of(settings), 1.0)
    writer = RecordingWriter(raw_redis, database, settings, StoreStatus())
    task = asyncio.create_task(writer.run())
    try:

        async def drained() -> bool:
            return (await stream_state(raw_redis, stream))["entries"] == 0

        await until(drained, 60, "the writer to drain the stream")
    finally:
        writer.stop()
        await asyncio.wait([task], timeout=10)
    # At most one entry past flush_size. Found: tens of thousands (count is entries, sized by a
    # running average of events per entry that small entries drive to 1).
    assert writer.most_held <= flush_size + big, writer.most_held


# -- 4. readiness: Redis down, every ingest 503, /ready still 200 ------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = PrivateRedis(directory)
    server.start()
    yield server
    server.stop()


@on_sqlite
async def test_ready_says_not_ready_while_redis_refuses_every_event(
    database: Database, database_url: str, private_redis: PrivateRedis
) -> None:
    settings = redis_settings(database_url, private_redis.url, unique_stream())
    buffer = RedisBuffer(database, settings)
    await buffer.start()
    try:
        assert buffer.unready() is None
        private_redis.stop()
        with pytest.raises((BufferUnavailable, OutcomeUnknown)):  # a race: 502 if the EOF is unread
            await buffer.append(rows(1))
        # Found: unready() looks only at the committer and the writer task, so a load balancer
        # keeps routing to an instance that answers 503 buffer_unavailable to every request.
        await until(lambda: buffer.unready() is not None, 10, "/ready to report Redis down")
    finally:
        await buffer.stop()


# -- 5. liveness: the spool's drainer task dies unsupervised, /ready never says so -------------


@on_sqlite
async def test_spool_drainer_that_died_is_restarted_or_reported(
    database: Database, database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    Path(f"{path}.drain.lock").mkdir()  # os.open fails in _take_drain_lock, outside any try
    buffer = SpoolBuffer(
        database,
        FirehoseSettings(database_url=database_url, spool_path=path, flush_size=50, flush_age_ms=5),
    )
    await buffer.start()
    try:
        await buffer.append(rows(2))

        async def drained_or_reported() -> bool:
            return buffer.unready() is not None or (await buffer.health()).depth == 0

        # Found: the task is gone (IsADirectoryError), nothing restarts it, unready() is None,
        # health() shows the depth growing with store "ok" and draining_here false.
        await until(drained_or_reported, 5, "a dead drainer to be restarted or reported")
    finally:
        await buffer.stop()


# -- 6. a spool file spooled for another store is drained into this one -----------------------


@on_sqlite
async def test_spool_left_for_another_store_is_not_drained_into_this_one(
    database: Database, database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"  # the default DATA_DIR/firehose-spool.db: one per host
    other_url = f"sqlite:///{tmp_path / 'other-store.db'}"  # never migrated: its store fails
    other = Database(create_engine(other_url))
    slow = {"flush_size": 100_000, "flush_age_ms": 3_600_000}
    first = SpoolBuffer(other, FirehoseSettings(database_url=other_url, spool_path=path, **slow))
    await first.start()
    theirs = rows(3)
    await first.append(theirs)
    await first.stop()  # its store refuses: the events stay spooled for *that* store
    await other.dispose()

    second = SpoolBuffer(
        database, FirehoseSettings(database_url=database_url, spool_path=path, **slow)
    )
    try:
        await second.start()
    except Exception:
        return  # refused to adopt another store's spool: what we want
    try:
        moved = await second.flush_once()
        counts = await store_counts(database, [r.event_id for r in theirs])
        # Found: moved == 3 and the other store's events are now in this one (and gone from
        # the spool, so the store they were accepted for never gets them).
        assert moved == 0 and set(counts.values()) == {0}, (moved, counts)
    finally:
        await second.stop()


# -- 7. loss: Redis that evicts keys under memory pressure is accepted as a buffer --------------


@on_sqlite
async def test_redis_that_may_evict_the_stream_is_refused_in_production(
    database: Database, database_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "redis-aof"
    directory.mkdir()
    server = PrivateRedis(directory, appendonly=True)
    server.start()
    admin = aioredis.from_url(server.url)
    try:
        # AOF on (what start() checks), but an eviction policy: under maxmemory Redis drops the
        # stream (every 202 in it) or the depth key (the bound then counts from zero).
        await admin.config_set("maxmemory-policy", "allkeys-lru")
        settings = redis_settings(database_url, server.url, unique_stream(), env="production")
        buffer = RedisBuffer(database, settings)
        # Found: start() reads appendonly/appendfsync/save only, and starts.
        with pytest.raises(RuntimeError, match="maxmemory-policy"):
            await buffer.start()
        await buffer.stop()
    finally:
        await admin.aclose()
        server.stop()


# -- 8. the default keys cannot run in one script on Redis Cluster ------------------------------


def test_default_stream_and_depth_keys_share_a_hash_slot() -> None:
    from redis.crc import key_slot

    keys = StreamKeys.of(FirehoseSettings())
    # Found: 'keel:firehose:events' and 'keel:firehose:events:depth' hash to different slots, so
    # COMMIT_LUA/ACK_LUA fail with CROSSSLOT on a cluster: every ingest 503 (the docstring of
    # StreamKeys relies on "{tags}" the default name does not have).
    assert key_slot(keys.stream.encode()) == key_slot(keys.depth.encode())


# -- 9. stale keys: through an outage every request past freshness waits on a failing lookup -----


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_stale_keys_do_not_send_every_request_to_the_missing_database(
    database_url: str,
) -> None:
    from sqlalchemy.engine import make_url

    from keel.core.auth import Scope
    from tests.core.test_auth import Clock, CountingVerifier, bearer
    from tests.support.cutting_proxy import CuttingProxy
    from tests.support.ledger import create_key

    url = make_url(database_url)
    proxy = await CuttingProxy(url.host or "127.0.0.1", url.port or 5432).start()
    through = Database(
        create_engine(url.set(host="127.0.0.1", port=proxy.port).render_as_string(False))
    )
    clock = Clock()
    verifier = CountingVerifier(through, clock, stale_seconds=3600)
    raw = await create_key(database_url, Scope.WRITE)
    try:
        await verifier.authenticate(bearer(raw), Scope.WRITE)
        await proxy.close()  # the store is away: the firehose buffers, its clients carry on
        clock.now += 60  # past the key's freshness, well within stale_seconds
        before = verifier.lookups
        for _ in range(20):  # 20 ingest requests, one after another, in the same second
            await verifier.authenticate(bearer(raw), Scope.WRITE)
        # Expected: a failed lookup is not retried for a while (the stale answer stands).
        # Found: 20 lookups, each waiting for a connection that cannot be made; with the store
        # blackholed (no RST) every ingest request waits out the connect timeout before its 202.
        assert verifier.lookups - before <= 2, verifier.lookups - before
    finally:
        await through.dispose()


# -- 10. the spool file holds every event's data, readable by every user of the host ------------


@on_sqlite
async def test_spool_file_is_readable_only_by_its_owner(
    database: Database, database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "spool.db"
    buffer = SpoolBuffer(database, FirehoseSettings(database_url=database_url, spool_path=path))
    await buffer.start()
    try:
        await buffer.append(rows(1))
        # Found: 0o644 under the usual umask (the drain lock beside it is created 0o600).
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.glob("spool.db*")}
        assert all(mode == oct(0o600) for mode in modes.values()), modes
    finally:
        await buffer.stop()


@on_sqlite
async def test_health_says_a_failover_may_lose_the_last_202s(
    database: Database, database_url: str, tmp_path: Path
) -> None:
    """Redis replicates asynchronously: with a replica attached, /health's durability must not
    promise more than the primary's own disk keeps."""
    (tmp_path / "primary").mkdir()
    (tmp_path / "replica").mkdir()
    primary = PrivateRedis(tmp_path / "primary", appendonly=True)
    primary.start()
    replica = PrivateRedis(tmp_path / "replica", replica_of=primary)
    replica.start()
    admin = aioredis.from_url(primary.url)
    try:

        async def replicas() -> int:
            return int((await admin.info("replication"))["connected_slaves"])

        await until(replicas, 10, "the replica to attach")
        buffer = RedisBuffer(database, redis_settings(database_url, primary.url, unique_stream()))
        await buffer.start()
        try:
            durability = (await buffer.health()).durability
        finally:
            await buffer.stop()
        assert durability.startswith("a Redis crash") and "failover" in durability, durability
    finally:
        await admin.aclose()
        replica.stop()
        primary.stop()
