"""``redis-drain-2m``: a 2 M backlog in Redis drained into a table that holds 3 M already.

The probe fills a stream of its own with 2,000,000 events as ingest writes them (entries of one
request's events, the depth counter raised to match) beside a table of 3,000,000, then starts
``keel serve firehose`` with the Redis buffer and times its writers from their first read until
the stream is empty: events/s, and every event stored exactly once.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import msgspec
import redis

from keel.bench import stage
from keel.bench.probes import Finding, ProbeContext
from keel.core.uuid7 import uuid7_batch
from keel.firehose.bench import (
    DRAIN_EVENTS,
    DRAIN_TARGET_EVENTS,
    ENTRY_EVENTS,
    PREFILLED,
    USERS,
)
from keel.firehose.bench_redis import (
    MB,
    CpuSpan,
    RssPeaks,
    depth,
    own_stream,
    pending,
    redis_pid,
    require_redis,
    server_env,
)
from keel.firehose.buffers.redis_writer import StreamKeys
from keel.firehose.events import EventRow, now_us

DRAIN_NAME = "bench.drain"
DRAIN_DEADLINE_S = 900.0

_PREFILL = """
INSERT INTO firehose_events (event_id, user_id, name, timestamp_us, original_timestamp_us,
                             received_at_us, metadata)
SELECT overlay(md5(i::text) placing lpad(to_hex($1::bigint + i / 100), 12, '0') from 1 for 12)
         ::uuid,
       'u' || (i % $3 + 1), 'bench.prefill', ($1::bigint + i / 100) * 1000,
       ($1::bigint + i / 100) * 1000, ($1::bigint + i / 100) * 1000,
       '{"path":"/p/1","ms":1}'::jsonb
FROM generate_series(1, $2::bigint) AS i
"""
_DRAINED = "SELECT count(*), count(DISTINCT event_id) FROM firehose_events WHERE name = $1"


async def _prefill(url: str, rows: int) -> None:
    conn = await asyncpg.connect(stage.plain_postgres_url(url), timeout=10)
    try:
        month_ago_ms = time.time_ns() // 1_000_000 - 30 * 86_400_000
        await conn.execute(_PREFILL, month_ago_ms, rows, USERS, timeout=None)
        await conn.execute("VACUUM (ANALYZE) firehose_events", timeout=None)
    finally:
        await conn.close()


async def _drained(url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(stage.plain_postgres_url(url), timeout=10)
    try:
        row = await conn.fetchrow(_DRAINED, DRAIN_NAME, timeout=None)
        assert row is not None
        return int(row[0]), int(row[1])
    finally:
        await conn.close()


def fill_stream(client: redis.Redis, keys: StreamKeys, events: int) -> None:
    """``events`` new events in entries of ``ENTRY_EVENTS``, as RedisBuffer's commit writes
    them (``n``, and ``rows`` the msgpack array of the rows), with the depth counter raised."""
    encode = msgspec.msgpack.Encoder(uuid_format="bytes").encode
    metadata = '{"path":"/p/1","ms":1}'
    per_pipeline = 100
    for first in range(0, events, ENTRY_EVENTS * per_pipeline):
        pipe = client.pipeline(transaction=False)
        added = 0
        for start in range(first, min(events, first + ENTRY_EVENTS * per_pipeline), ENTRY_EVENTS):
            n = min(ENTRY_EVENTS, events - start)
            received = now_us()
            rows = [
                EventRow(event_id, f"u{(start + i) % USERS + 1}", DRAIN_NAME, received,
                         received, None, received, metadata)
                for i, event_id in enumerate(uuid7_batch(n))
            ]  # fmt: skip
            pipe.xadd(keys.stream, {"n": n, "rows": encode(rows)})
            added += n
        pipe.incrby(keys.depth, added)
        pipe.execute()


def _wait_for_drain(
    client: redis.Redis,
    keys: StreamKeys,
    server: stage.Server,
    cpu: CpuSpan,
    rss: RssPeaks,
    total: int,
) -> float:
    """Seconds from the writers' first read until the stream is empty (both polled every 20 ms;
    the CPU is counted over the same span)."""
    give_up = time.monotonic() + DRAIN_DEADLINE_S
    started: float | None = None
    while time.monotonic() < give_up:
        if server.process is None or server.process.poll() is not None:
            raise stage.StageError(f"the server exited; see {server.log}")
        now = time.monotonic()
        if started is None and (pending(client, keys) or depth(client, keys) < total):
            started = now
            cpu.begin()
        elif started is not None and depth(client, keys) == 0 and client.xlen(keys.stream) == 0:
            return now - started
        rss.sample()
        time.sleep(0.02)
    raise stage.StageError(f"the backlog was not drained within {DRAIN_DEADLINE_S:g} s")


def measure_drain(ctx: ProbeContext) -> list[Finding]:
    """The 2 M backlog into a table of 3 M, by the server's own writers; the database is
    dropped afterwards (it holds gigabytes)."""
    options = ctx.options
    require_redis(ctx)  # before minutes of filling a table for nothing
    ctx.status("fresh postgres database")
    with stage.scratch_postgres(ctx.label, options.work_dir, options.postgres_url) as url:
        return _drain(ctx, url)


def _drain(ctx: ProbeContext, url: str) -> list[Finding]:
    options = ctx.options
    stage.run_keel("db", "upgrade", "firehose", "--database-url", url, log=ctx.log)
    ctx.status(f"filling the table with {PREFILLED:,} events")
    asyncio.run(_prefill(url, PREFILLED))
    with own_stream(ctx) as (client, keys):
        # As a serving keel creates it at start: ingest ran before these writers did.
        client.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
        ctx.status(f"filling the stream with {DRAIN_EVENTS:,} events")
        fill_stream(client, keys, DRAIN_EVENTS)
        stream_mb = (client.memory_usage(keys.stream, samples=0) or 0) / MB
        ctx.status(f"draining with {ctx.workers} writer(s)")
        server = stage.Server(["serve", "firehose"], url, ctx.workers, server_env(ctx, keys),
                              ctx.log, cpus=options.server_cpus)  # fmt: skip
        with server:
            cpu = CpuSpan(server.pid, stage.postgres_database_name(url), redis_pid(client))
            rss = RssPeaks(server.pid)
            seconds = _wait_for_drain(client, keys, server, cpu, rss, DRAIN_EVENTS)
            cpu_text = cpu.end(DRAIN_EVENTS, "event")
    ctx.status("counting the drained events")
    stored, distinct = asyncio.run(_drained(url))
    rate = DRAIN_EVENTS / seconds
    once = stored == distinct == DRAIN_EVENTS
    return [
        Finding(
            name="redis-drain-2m",
            rate=rate,
            result=f"{rate:,.0f} events/s",
            detail=(
                f"{DRAIN_EVENTS:,} events ({stream_mb:.0f} MB of stream, entries of"
                f" {ENTRY_EVENTS}) drained in {seconds:.1f} s into a table of {PREFILLED:,};"
                f" stored {stored:,}, distinct ids {distinct:,}; server processes' peak RSS"
                f" {rss.text()}"
            ),
            cpu=cpu_text,
            target=f"≥ {DRAIN_TARGET_EVENTS:,} events/s",
            met=once and rate >= DRAIN_TARGET_EVENTS,
            checks_ok=once,
        )
    ]
