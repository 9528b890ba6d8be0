"""The firehose's bench declaration: its scripts, targets and database checks (no load here)."""

from __future__ import annotations

import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keel.bench.machine import CpuUse
from keel.bench.report import markdown
from keel.bench.runner import BenchOptions, Run, ScenarioResult
from keel.bench.scenarios import REFERENCES, Backend
from keel.bench.wrk import WrkResult
from keel.firehose.bench import BATCH_SIZE, BENCH, FirehoseWorkload, Load, lua_script
from keel.registry import services


@pytest.mark.parametrize("load", list(Load))
def test_scripts_make_a_fresh_id_for_every_event(load: Load) -> None:
    script = lua_script(load, "kf_secret")
    assert 'wrk.headers["Authorization"] = "Bearer kf_secret"' in script
    single = load is Load.EVENT_V7
    assert ('"/events"' in script) is single
    assert ('"/events/batch"' in script) is not single
    assert ("uuid4()" in script.split("function request()")[1]) is (load is Load.BATCH_V4)
    assert f'"name":"bench.{1 if single else BATCH_SIZE}"' in script


def test_every_scenario_has_a_target_and_batches_count_their_events() -> None:
    for scenario in BENCH.scenarios:
        assert scenario.target_rps > 0
        per_request = 1 if scenario.load == Load.EVENT_V7 else BATCH_SIZE
        assert scenario.items_per_request == per_request
        if scenario.backend is Backend.POSTGRES:  # the buffer is named, not left to "auto"
            assert dict(scenario.env)["KEEL_FIREHOSE_BUFFER"]
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
