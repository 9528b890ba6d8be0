"""What the firehose's Redis probes share: a stream of their own, the server set up with the
Redis buffer, and where CPU and memory went meanwhile.

The probes themselves: :mod:`.bench_drain` (a 2 M backlog drained into a full table) and
:mod:`.bench_sustained` (batches at a steady rate, then more than the server takes). Only keys of
their own are touched (``keel:{bench-<pid>-<label>}:events`` and its depth), deleted afterwards.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import redis

from keel.bench.machine import CpuSample, cpu_between, sample_cpu
from keel.bench.probes import (
    ProbeContext,
    ProbeSkipped,
    process_cpu_seconds,
    session_rss_bytes,
)
from keel.firehose.buffers.redis_writer import StreamKeys
from keel.firehose.settings import FirehoseSettings

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
MB = 1024 * 1024


def redis_url(ctx: ProbeContext) -> str:
    return ctx.options.server_env().get("KEEL_REDIS_URL", DEFAULT_REDIS_URL)


def stream_keys(label: str) -> StreamKeys:
    """A stream of this run's own, in one hash slot with its depth counter (as keel's are)."""
    stream = f"keel:{{bench-{os.getpid()}-{label}}}:events"
    return StreamKeys(
        stream, f"{stream}:depth", FirehoseSettings.model_fields["redis_group"].default
    )


def server_env(ctx: ProbeContext, keys: StreamKeys) -> dict[str, str]:
    """The server as ``KEEL_FIREHOSE_BUFFER=redis`` runs it, writers at their default settings."""
    return {
        **ctx.options.server_env(),
        "KEEL_FIREHOSE_BUFFER": "redis",
        "KEEL_REDIS_URL": redis_url(ctx),
        "KEEL_FIREHOSE_REDIS_STREAM": keys.stream,
    }


def require_redis(ctx: ProbeContext) -> None:
    """Skip the probe, saying why, when no Redis answers (as PostgreSQL's rows are skipped)."""
    client = redis.Redis.from_url(redis_url(ctx), socket_connect_timeout=2)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ProbeSkipped(f"Redis unreachable at {redis_url(ctx)}: {exc}") from None
    finally:
        client.close()


@contextmanager
def own_stream(ctx: ProbeContext) -> Iterator[tuple[redis.Redis, StreamKeys]]:
    """A client and this run's keys, empty before and deleted after, whatever happens."""
    require_redis(ctx)
    client = redis.Redis.from_url(redis_url(ctx))
    keys = stream_keys(ctx.label)
    try:
        client.delete(keys.stream, keys.depth)
        yield client, keys
    finally:
        client.delete(keys.stream, keys.depth)
        client.close()


def redis_pid(client: redis.Redis) -> int | None:
    """Redis's process, if it runs on this machine (its CPU is then counted)."""
    host = client.connection_pool.connection_kwargs.get("host", "")
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None
    pid = client.info("server").get("process_id")
    return int(pid) if pid else None


@dataclass
class CpuSpan:
    """Server, database and Redis CPU between two points in time."""

    server_pid: int
    database: str | None
    redis_pid: int | None
    start: CpuSample | None = None
    redis_start: float = 0.0

    def begin(self) -> None:
        self.start = sample_cpu(self.server_pid, self.database, time.monotonic())
        self.redis_start = self._redis()

    def _redis(self) -> float:
        found = None if self.redis_pid is None else process_cpu_seconds(self.redis_pid)
        return found or 0.0

    def end(self, items: int, item: str) -> str:
        """In words: cores of each, and CPU microseconds per item of each."""
        assert self.start is not None
        after = sample_cpu(self.server_pid, self.database, time.monotonic())
        use, wall = cpu_between(self.start, after), after.wall - self.start.wall
        redis_cores = (self._redis() - self.redis_start) / max(wall, 1e-9)
        parts = [("server", use.server_cores), ("db", use.database_cores)]
        parts += [] if self.redis_pid is None else [("redis", redis_cores)]
        per_item = 1e6 * wall / max(items, 1)
        return (
            " / ".join(f"{name} {cores:.2f}" for name, cores in parts)
            + f" cores (other {use.other_cores:.2f}); µs CPU/{item}: "
            + " / ".join(f"{name} {cores * per_item:.1f}" for name, cores in parts)
        )


@dataclass
class RssPeaks:
    """The largest resident size each server process reached while sampled."""

    session: int
    peak: dict[int, int] = field(default_factory=dict)

    def sample(self) -> None:
        for pid, size in session_rss_bytes(self.session).items():
            self.peak[pid] = max(size, self.peak.get(pid, 0))

    @property
    def max_mb(self) -> float:
        return max(self.peak.values(), default=0) / MB

    def text(self) -> str:
        sizes = sorted(self.peak.values(), reverse=True)
        return ", ".join(f"{size / MB:.0f}" for size in sizes) + " MB"


def pending(client: redis.Redis, keys: StreamKeys) -> int:
    for group in client.xinfo_groups(keys.stream):
        if group["name"] in (keys.group, keys.group.encode()):
            return int(group["pending"])
    return 0


def depth(client: redis.Redis, keys: StreamKeys) -> int:
    return int(client.get(keys.depth) or 0)
