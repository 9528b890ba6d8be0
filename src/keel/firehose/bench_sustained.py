"""``redis-sustained-batch-500`` and ``redis-overload-rss``: the Redis buffer under batches.

wrk sends batches of 500 at about ``SUSTAINED_EVENTS`` a second (each connection pausing between
its requests) for runs x duration seconds, then with no pause for as long again. Meanwhile the
backlog, the stream's memory, Redis's and every server process's RSS are sampled: the writers
keep up when the backlog at the end of the steady phase stays under two flush batches per
writer, and Redis's memory is flat when the stream did not grow since the middle.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from keel.bench import stage, wrk
from keel.bench.probes import Finding, ProbeContext
from keel.firehose.bench import (
    BATCH_SIZE,
    RSS_TARGET_MB,
    SUSTAINED_EVENTS,
    FirehoseWorkload,
    Load,
    lua_script,
)
from keel.firehose.bench_redis import (
    MB,
    CpuSpan,
    RssPeaks,
    depth,
    own_stream,
    redis_pid,
    redis_url,
    require_redis,
    server_env,
)
from keel.firehose.buffers.redis_writer import StreamKeys
from keel.firehose.settings import FirehoseSettings

SAMPLE_EVERY_S = 0.5
SETTLE_DEADLINE_S = 120.0
FLUSHES_BEHIND = 2  # the writers keep up: at most this many flush batches each left at the end
# wrk is closed-loop: each connection waits this long after an answer before its next batch,
# which offers about SUSTAINED_EVENTS a second while answers are quick.
PACED_DELAY_MS = round(wrk.CONNECTIONS * BATCH_SIZE * 1000 / SUSTAINED_EVENTS)


@dataclass(frozen=True)
class _Sample:
    at: float
    depth: int  # events in the buffer: accepted, not yet acknowledged by a writer
    stream_bytes: int
    used_memory: int  # the whole Redis instance's (other users' keys included)


class _Sampler:
    """Samples the buffer, Redis's memory and the server's RSS every ``SAMPLE_EVERY_S`` on a
    thread of its own while the load runs."""

    def __init__(self, redis_url: str, keys: StreamKeys, rss: RssPeaks) -> None:
        self.samples: list[_Sample] = []
        self._client = redis.Redis.from_url(redis_url)
        self._keys, self._rss = keys, rss
        self._done = threading.Event()

    def sample(self) -> _Sample:
        self._rss.sample()
        found = _Sample(
            time.monotonic(),
            depth(self._client, self._keys),
            int(self._client.memory_usage(self._keys.stream) or 0),
            int(self._client.info("memory")["used_memory"]),
        )
        self.samples.append(found)
        return found

    @contextmanager
    def running(self) -> Iterator[None]:
        self.sample()
        thread = threading.Thread(target=self._loop, name="keel-bench-sampler", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._done.set()
            thread.join()
            self.sample()
            self._client.close()

    def _loop(self) -> None:
        while not self._done.wait(SAMPLE_EVERY_S):
            self.sample()

    def middle(self) -> _Sample:
        halfway = statistics.mean((self.samples[0].at, self.samples[-1].at))
        return min(self.samples, key=lambda s: abs(s.at - halfway))


def _wait_until_empty(client: redis.Redis, keys: StreamKeys) -> float | None:
    """Seconds the writers took to store what was left (None: not within
    ``SETTLE_DEADLINE_S``)."""
    started = time.monotonic()
    while time.monotonic() - started < SETTLE_DEADLINE_S:
        if depth(client, keys) == 0:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def _three(samples: list[_Sample], pick: str, unit: float, fmt: str) -> str:
    return " → ".join(format(getattr(s, pick) / unit, fmt) for s in samples)


@dataclass(frozen=True)
class _Phase:
    """One wrk call of a probe, with what was sampled meanwhile."""

    run: wrk.WrkResult
    samples: _Sampler
    rss: RssPeaks
    cpu: str
    settled: float | None  # seconds the stream took to empty after it

    @property
    def events_per_s(self) -> float:
        """Events accepted (202) a second: a 503 carried none into the buffer."""
        return self.run.succeeded * BATCH_SIZE / max(self.run.duration_s, 1e-9)


class _Load:
    """The server under test and what drives it, for the sustained probe's phases."""

    def __init__(
        self,
        ctx: ProbeContext,
        server: stage.Server,
        key: str,
        url: str,
        stream: tuple[redis.Redis, StreamKeys],
    ) -> None:
        self.ctx, self.server, self.key, self.url = ctx, server, key, url
        self.client, self.keys = stream
        self.acknowledged = 0
        self.wrk_calls = 0

    def script(self, name: str, delay_ms: int | None) -> Path:
        path = self.ctx.options.work_dir / f"{self.ctx.label}-{name}.lua"
        path.write_text(lua_script(Load.BATCH_V7, self.key, delay_ms=delay_ms))
        return path

    def drive(self, script: Path, seconds: float) -> wrk.WrkResult:
        run = wrk.run_wrk(self.server.base_url, script, seconds, self.ctx.log)
        self.acknowledged += run.succeeded
        self.wrk_calls += 1
        return run

    def phase(self, script: Path, seconds: float) -> _Phase:
        rss = RssPeaks(self.server.pid)
        sampler = _Sampler(redis_url(self.ctx), self.keys, rss)
        cpu = CpuSpan(
            self.server.pid, stage.postgres_database_name(self.url), redis_pid(self.client)
        )
        cpu.begin()
        with sampler.running():
            run = self.drive(script, seconds)
        cpu_text = cpu.end(run.succeeded * BATCH_SIZE, "event")
        self.ctx.status("waiting for the writers to empty the stream")
        return _Phase(run, sampler, rss, cpu_text, _wait_until_empty(self.client, self.keys))


def measure_sustained(ctx: ProbeContext) -> list[Finding]:
    """Batches of 500 for runs x duration seconds at a steady rate, then as fast as wrk can send
    them for as long again; the buffer, Redis's memory and the server's RSS sampled. The
    database (millions of events) is dropped afterwards."""
    options = ctx.options
    require_redis(ctx)
    ctx.status("fresh postgres database")
    with stage.scratch_postgres(ctx.label, options.work_dir, options.postgres_url) as url:
        return _sustain(ctx, url)


def _sustain(ctx: ProbeContext, url: str) -> list[Finding]:
    options = ctx.options
    key = stage.install_service("firehose", url, ctx.log)
    seconds = options.runs * options.duration_s
    with own_stream(ctx) as (client, keys):
        server = stage.Server(["serve", "firehose"], url, ctx.workers, server_env(ctx, keys),
                              ctx.log, cpus=options.server_cpus)  # fmt: skip
        with server:
            server.wait_ready()
            load = _Load(ctx, server, key, url, (client, keys))
            paced = load.script("paced", PACED_DELAY_MS)
            ctx.status(f"warm-up {options.warmup_s:g} s")
            load.drive(paced, options.warmup_s)
            _wait_until_empty(client, keys)
            ctx.status(f"{SUSTAINED_EVENTS:,} events/s for {seconds:g} s")
            steady = load.phase(paced, seconds)
            ctx.status(f"as fast as wrk sends for {seconds:g} s")
            overload = load.phase(load.script("overload", None), seconds)
    ctx.status("checking the database")
    workload = FirehoseWorkload()
    stored = workload.count_writes(url) or 0
    in_flight = load.wrk_calls * wrk.CONNECTIONS + overload.run.socket_errors
    checks = (
        workload.audit(url, ctx.log) is True
        and load.acknowledged <= stored <= load.acknowledged + in_flight
    )
    return [_keeping_up(ctx, steady, checks), _overloaded(ctx, overload, checks)]


def _backlog(phase: _Phase, bound: int) -> str:
    samples = phase.samples
    marks = [samples.samples[0], samples.middle(), samples.samples[-1]]
    after = (
        f"not emptied within {SETTLE_DEADLINE_S:g} s"
        if phase.settled is None
        else f"emptied {phase.settled:.1f} s after the load stopped"
    )
    return (
        f"backlog start → middle → end: {_three(marks, 'depth', 1, ',.0f')} events"
        f" (max {max(s.depth for s in samples.samples):,}; bound {bound:,}), {after};"
        f" stream memory {_three(marks, 'stream_bytes', MB, '.1f')} MB; Redis used_memory"
        f" {_three(marks, 'used_memory', MB, '.0f')} MB (the whole, shared instance)"
    )


def _keeping_up(ctx: ProbeContext, phase: _Phase, checks: bool) -> Finding:
    flush_size = FirehoseSettings.model_fields["flush_size"].default
    bound = FLUSHES_BEHIND * flush_size * ctx.workers
    samples, run = phase.samples, phase.run
    middle, end = samples.middle(), samples.samples[-1]
    keeps_up = end.depth <= bound
    flat = end.stream_bytes <= middle.stream_bytes + MB
    return Finding(
        name="redis-sustained-batch-500",
        rate=phase.events_per_s,
        result=f"{phase.events_per_s:,.0f} events/s",
        detail=(
            f"paced for about {SUSTAINED_EVENTS:,} events/s over {run.duration_s:.0f} s (wrk:"
            f" {PACED_DELAY_MS} ms between a connection's batches), {run.errors:,} errors,"
            f" p99 {run.p99_ms:.0f} ms; {_backlog(phase, bound)}; peak RSS {phase.rss.text()}"
        ),
        cpu=phase.cpu,
        target=(
            f"writers keep up (backlog at the end ≤ {FLUSHES_BEHIND} flush batches per writer)"
            ", stream memory flat (end ≤ middle + 1 MB)"
        ),
        met=keeps_up and flat and not run.errors,
        checks_ok=checks,
    )


def _overloaded(ctx: ProbeContext, phase: _Phase, checks: bool) -> Finding:
    run, rss = phase.run, phase.rss
    bound = FirehoseSettings.model_fields["buffer_max_events"].default
    return Finding(
        name="redis-overload-rss",
        rate=0.0,
        result=f"{rss.max_mb:.0f} MB",
        detail=(
            f"peak RSS of each server process (supervisor and {ctx.workers} worker(s)), sampled"
            f" every {SAMPLE_EVERY_S:g} s over {run.duration_s:.0f} s of batches from wrk"
            f" -c{wrk.CONNECTIONS} with no pause: {rss.text()}. Meanwhile"
            f" {run.requests_per_s * BATCH_SIZE:,.0f} events/s offered,"
            f" {phase.events_per_s:,.0f} accepted, {run.non_2xx:,} requests refused (503 once"
            f" the buffer holds its bound); {_backlog(phase, bound)}"
        ),
        cpu=phase.cpu,
        target=f"< {RSS_TARGET_MB} MB per process",
        met=rss.max_mb < RSS_TARGET_MB,
        checks_ok=checks,
    )
