"""The firehose's bench declaration: its scripts, targets and database checks (no load here)."""

from __future__ import annotations

import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
import redis

from keel.bench.machine import CpuUse
from keel.bench.probes import Finding, ProbeResult, run_probe
from keel.bench.report import markdown
from keel.bench.runner import BenchOptions, Observer, Run, ScenarioResult
from keel.bench.scenarios import REFERENCES, Backend
from keel.bench.wrk import WrkResult
from keel.firehose.bench import (
    BATCH_SIZE,
    BENCH,
    ENTRY_EVENTS,
    FirehoseWorkload,
    Load,
    lua_script,
)
from keel.firehose.bench_drain import fill_stream
from keel.firehose.bench_redis import stream_keys
from keel.firehose.events import EventRow
from keel.registry import services
from keel.serving import free_port


def test_a_paced_script_pauses_every_connection_between_its_requests() -> None:
    assert "function delay()\n  return 640\nend" in lua_script(Load.BATCH_V7, "k", delay_ms=640)
    assert "function delay()" not in lua_script(Load.BATCH_V7, "k")


@pytest.mark.parametrize("load", list(Load))
def test_scripts_make_a_fresh_id_for_every_event(load: Load) -> None:
    script = lua_script(load, "kf_secret")
    assert 'wrk.headers["Authorization"] = "Bearer kf_secret"' in script
    single = load is Load.EVENT_V7
    assert ('"/events"' in script) is single
    assert ('"/events/batch"' in script) is not single
    assert ("uuid4()" in script.split("function request()")[1]) is (load is Load.BATCH_V4)
    assert f'"name":"bench.{1 if single else BATCH_SIZE}"' in script


def test_sqlite_rows_carry_the_targets_and_postgres_rows_none() -> None:
    """The issue sets the single-event and batch targets for SQLite at its defaults with UUIDv7
    ids; PostgreSQL-direct rows, random v4 ids and synchronous=NORMAL are measured beside them,
    not held to them."""
    targeted = {"sqlite-event", "sqlite-batch-500"}
    for scenario in BENCH.scenarios:
        per_request = 1 if scenario.load == Load.EVENT_V7 else BATCH_SIZE
        assert scenario.items_per_request == per_request
        assert scenario.has_target is (scenario.name in targeted), scenario.name
        if scenario.backend is Backend.POSTGRES:  # the buffer is named, not left to "auto"
            assert dict(scenario.env)["KEEL_FIREHOSE_BUFFER"]
            assert scenario.target_text("events") == "not a target"
    batch = BENCH.all_scenarios()["sqlite-batch-500"]
    assert batch.target_text("events") == "≥ 150,000 events/s"


def test_the_registered_firehose_benches_its_scenarios_and_the_references() -> None:
    bench = services()["firehose"].load_bench()
    assert bench is BENCH
    assert list(BENCH.all_scenarios())[len(BENCH.scenarios) :] == [s.name for s in REFERENCES]


def _store(path: Path, names: list[str], repeat_id: bool = False) -> str:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE firehose_events (event_id BLOB, name TEXT)")
        ids = [uuid.uuid4().bytes for _ in names]
        if repeat_id:
            ids[-1] = ids[0]
        conn.executemany(
            "INSERT INTO firehose_events VALUES (?, ?)", list(zip(ids, names, strict=True))
        )
    return f"sqlite:///{path}"


def test_requests_are_counted_back_from_the_stored_events(tmp_path: Path) -> None:
    url = _store(tmp_path / "ok.db", ["bench.1"] * 3 + [f"bench.{BATCH_SIZE}"] * BATCH_SIZE * 2)
    workload = FirehoseWorkload()
    assert workload.count_writes(url) == 3 + 2
    assert workload.audit(url, tmp_path / "log") is True


def test_the_audit_catches_a_partial_batch_and_a_repeated_id(tmp_path: Path) -> None:
    partial = _store(tmp_path / "partial.db", [f"bench.{BATCH_SIZE}"] * (BATCH_SIZE + 1))
    repeated = _store(tmp_path / "repeated.db", ["bench.1"] * 3, repeat_id=True)
    workload = FirehoseWorkload()
    assert workload.audit(partial, tmp_path / "log") is False
    assert workload.audit(repeated, tmp_path / "log") is False
    assert "A PARTIAL BATCH" in (tmp_path / "log").read_text()


def test_the_table_shows_events_per_second_for_batches() -> None:
    scenario = BENCH.all_scenarios()["sqlite-batch-500"]
    wrk = WrkResult(3000, 10.0, 300.0, 100.0, 200.0, 0, 0)
    run = Run(wrk, CpuUse(1.0, 0.0, 0.1, 1.1))
    result = ScenarioResult(scenario, 2, runs=[run], audit_ok=True)
    when = datetime(2026, 1, 2, tzinfo=UTC)
    text = markdown(BENCH, [result], {}, BenchOptions(runs=1), when)
    assert "median events/s" in text
    row = next(line for line in text.splitlines() if line.startswith("| sqlite-batch-500 "))
    assert "**300**" in row and "**150,000**" in row and row.endswith("| yes |")


def test_a_postgres_row_says_it_has_no_target() -> None:
    scenario = BENCH.all_scenarios()["postgres-direct-batch-500"]
    run = Run(WrkResult(3000, 10.0, 300.0, 100.0, 200.0, 0, 0), CpuUse(1.0, 0.5, 0.1, 1.6))
    result = ScenarioResult(scenario, 2, runs=[run], audit_ok=True)
    text = markdown(BENCH, [result], {}, BenchOptions(runs=1), datetime(2026, 1, 2, tzinfo=UTC))
    row = next(line for line in text.splitlines() if line.startswith("| postgres-direct-batch"))
    assert row.endswith("| not a target | — |")


def test_the_probes_get_a_table_of_their_own() -> None:
    drain, sustained = BENCH.probes
    assert [p.name for p in BENCH.probes] == ["redis-drain-2m", "redis-sustained-batch-500"]
    assert all(callable(p.measurer()) for p in BENCH.probes)
    finding = Finding(
        name="redis-drain-2m",
        rate=120_000.0,
        result="120,000 events/s",
        detail="2,000,000 events drained in 16.7 s | into a table of 3,000,000",
        cpu="server 0.40 / db 0.90 cores",
        target="≥ 100,000 events/s",
        met=True,
        checks_ok=True,
    )
    measured = [
        ProbeResult(drain, 1, findings=[finding]),
        ProbeResult(sustained, 2, failure="PostgreSQL unreachable"),
    ]
    text = markdown(BENCH, [], {}, BenchOptions(runs=1), datetime(2026, 1, 2, tzinfo=UTC), measured)
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("| redis-drain-2m |"))
    assert "**120,000 events/s**" in row and "16.7 s \\| into" in row
    assert row.endswith("| ok | ≥ 100,000 events/s | yes |")
    skipped = next(line for line in lines if line.startswith("| redis-sustained-batch-500 |"))
    assert "skipped: PostgreSQL unreachable" in skipped
    assert "- `redis-drain-2m`: a Redis stream holding 2,000,000 events" in text


async def test_the_drain_fills_its_stream_as_ingest_writes_it(redis_url: str) -> None:
    """Entries of one request's events, ``n`` and msgpack ``rows`` as RedisBuffer's commit
    writes them, and the depth counter raised to match: what the writers drain in production."""
    client = redis.Redis.from_url(redis_url)
    keys = stream_keys(f"test-{uuid.uuid4().hex[:8]}")
    try:
        fill_stream(client, keys, 2 * ENTRY_EVENTS + 7)
        entries = client.xrange(keys.stream)
        assert [int(fields[b"n"]) for _, fields in entries] == [ENTRY_EVENTS, ENTRY_EVENTS, 7]
        rows = [msgspec.msgpack.decode(f[b"rows"], type=list[EventRow]) for _, f in entries]
        assert [len(r) for r in rows] == [ENTRY_EVENTS, ENTRY_EVENTS, 7]
        assert len({row.event_id for batch in rows for row in batch}) == 2 * ENTRY_EVENTS + 7
        assert int(client.get(keys.depth) or 0) == 2 * ENTRY_EVENTS + 7
    finally:
        client.delete(keys.stream, keys.depth)
        client.close()


@pytest.mark.parametrize("probe", ["redis-drain-2m", "redis-sustained-batch-500"])
def test_a_redis_probe_without_redis_is_skipped_not_failed(probe: str, tmp_path: Path) -> None:
    """`make bench` on a machine with PostgreSQL and no Redis failed (exit 1) on these probes;
    like the PostgreSQL rows without PostgreSQL, they are skipped and say why, before any set-up
    (the drain's would first fill a table of 3 M rows for nothing)."""
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    options = BenchOptions(work_dir=tmp_path, extra_env={"KEEL_REDIS_URL": closed})
    [declared] = [p for p in BENCH.probes if p.name == probe]
    result = run_probe(declared, 1, options, Observer())
    assert result.skipped and not result.findings
    assert result.failure is not None and result.failure.startswith("skipped: Redis unreachable")
