"""The results table and the database checks behind it, on made-up runs (nothing is timed)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from keel.bench.machine import CpuUse
from keel.bench.report import markdown, write_results
from keel.bench.runner import BenchOptions, Run, ScenarioResult
from keel.bench.scenarios import REFERENCES
from keel.bench.wrk import WrkResult
from keel.ledger.bench import BENCH

SCENARIOS = BENCH.all_scenarios()

WHEN = datetime(2026, 1, 2, 3, 4, tzinfo=UTC)


def _run(rps: float, p99: float = 20.0, non_2xx: int = 0, other: float = 0.0) -> Run:
    result = WrkResult(
        requests=int(rps * 10),
        duration_s=10.0,
        requests_per_s=rps,
        p50_ms=5.0,
        p99_ms=p99,
        non_2xx=non_2xx,
        socket_errors=0,
    )
    return Run(result, CpuUse(server_cores=1.0, database_cores=0.0, wrk_cores=0.1,
                              machine_busy_cores=1.1 + other))  # fmt: skip


def _result(name: str, runs: list[Run], written: int | None = None) -> ScenarioResult:
    result = ScenarioResult(SCENARIOS[name], workers=1, runs=runs, audit_ok=True)
    result.acknowledged = sum(r.result.succeeded for r in runs)
    result.wrk_calls = len(runs)
    result.entries_written = result.acknowledged if written is None else written
    return result


def test_a_row_shows_medians_and_whether_the_target_was_met() -> None:
    result = _result("sqlite-post-spread", [_run(4100), _run(3900), _run(4500)])
    text = markdown(BENCH, [result], {"CPU": "test"}, BenchOptions(runs=3), WHEN)
    row = next(line for line in text.splitlines() if line.startswith("| sqlite-post-spread"))
    assert "**4,100**" in row and "3,900-4,500" in row
    assert row.endswith("| yes |")
    assert "Noisy machine" not in text


def test_errors_and_latency_keep_a_target_from_being_met() -> None:
    slow = _result("sqlite-post-spread", [_run(5000, p99=80.0)] * 3)
    failing = _result("sqlite-get-user", [_run(7000, non_2xx=3), _run(7000), _run(7000)])
    text = markdown(BENCH, [slow, failing], {}, BenchOptions(runs=3), WHEN)
    assert "| **no** |" in text
    assert "**3** in 1/3 runs" in text and "no (errors)" in text


def test_entries_must_cover_every_acknowledged_posting() -> None:
    runs = [_run(1000)]
    assert _result("postgres-post-hot", runs).entries_consistent is True
    lost = _result("postgres-post-hot", runs, written=10_000 - 1)
    assert lost.entries_consistent is False
    in_flight = _result("postgres-post-hot", runs, written=10_000 + 64)
    assert in_flight.entries_consistent is True
    too_many = _result("postgres-post-hot", runs, written=10_000 + 65)
    assert too_many.entries_consistent is False


def test_a_busy_machine_is_called_out(tmp_path: Path) -> None:
    noisy = _result("sqlite-get-user", [_run(3000, other=1.2)] * 3)
    written = write_results(BENCH, [noisy], {}, BenchOptions(runs=3), tmp_path)
    assert "Noisy machine" in (tmp_path / "ledger.md").read_text()
    assert {p.suffix for p in written} >= {".md", ".json"}


def test_a_skipped_scenario_keeps_its_row() -> None:
    skipped = ScenarioResult(SCENARIOS["postgres-post-hot"], 2, failure="no PostgreSQL")
    text = markdown(BENCH, [skipped], {}, BenchOptions(), WHEN)
    assert "skipped: no PostgreSQL" in text


def test_reference_rows_have_no_target_and_give_their_ratio() -> None:
    bare = _result("reference-bare", [_run(36_000)] * 3)
    noop = _result("reference-noop", [_run(18_000)] * 3)
    bare.entries_written = noop.entries_written = None
    text = markdown(BENCH, [bare, noop], {}, BenchOptions(runs=3), WHEN)
    row = next(line for line in text.splitlines() if line.startswith("| reference-noop"))
    assert row.endswith("| reference | — |")
    assert "the no-op route serves 50% of the bare handler's rate" in text
    assert {s.name for s in REFERENCES} <= set(SCENARIOS)
