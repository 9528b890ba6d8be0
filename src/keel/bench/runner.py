"""One scenario: fresh database, seeded records, the server, a warm-up, N wrk runs, the checks.

What is seeded, requested and checked comes from the service's
:class:`~keel.bench.scenarios.Workload`; the reference rows need none of it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keel.bench import stage, wrk
from keel.bench.cpus import pinned
from keel.bench.machine import CpuUse, cpu_between, sample_cpu
from keel.bench.scenarios import REFERENCE_LUA, Backend, Scenario, ServiceBench


@dataclass(frozen=True)
class BenchOptions:
    runs: int = 5
    duration_s: float = 10.0
    warmup_s: float = 5.0
    seed: int = 1000  # records the workload creates before the load (the ledger's accounts)
    postgres_url: str = "postgresql://postgres@127.0.0.1:5432/test"
    work_dir: Path = Path("bench/work")
    extra_env: dict[str, str] = field(default_factory=dict)
    server_cpus: frozenset[int] | None = None  # None: wherever the scheduler puts them
    wrk_cpus: frozenset[int] | None = None

    def server_env(self) -> dict[str, str]:
        """Production defaults, except a rate limit no bench can reach; then the service's and
        the command line's settings."""
        return {"KEEL_RATE_LIMIT": "1000000/second", **self.extra_env}


@dataclass(frozen=True)
class Run:
    result: wrk.WrkResult
    cpu: CpuUse

    def to_json(self) -> dict[str, Any]:
        return {
            **self.result.to_json(),
            "server_cores": self.cpu.server_cores,
            "database_cores": self.cpu.database_cores,
            "wrk_cores": self.cpu.wrk_cores,
            "other_cores": self.cpu.other_cores,
        }


@dataclass
class ScenarioResult:
    """A scenario at one worker count: its runs and what the database said afterwards."""

    scenario: Scenario
    workers: int
    runs: list[Run] = field(default_factory=list)
    acknowledged: int = 0  # 2xx answers wrk counted, warm-up included
    wrk_calls: int = 0
    timeouts: int = 0
    entries_before: int = 0  # rows the seeding wrote
    entries_written: int | None = None
    audit_ok: bool | None = None
    failure: str | None = None  # why the scenario could not run or finish
    server_log: str = ""

    @property
    def ran(self) -> bool:
        return bool(self.runs)

    def median(self, pick: Callable[[Run], float]) -> float:
        return statistics.median(pick(r) for r in self.runs)

    @property
    def rps(self) -> list[float]:
        return [r.result.requests_per_s for r in self.runs]

    @property
    def errors(self) -> int:
        return sum(r.result.errors for r in self.runs)

    @property
    def runs_with_errors(self) -> int:
        return sum(1 for r in self.runs if r.result.errors)

    @property
    def entries_consistent(self) -> bool | None:
        """Every 2xx was committed; no more were written than could have been in flight."""
        if not self.scenario.writes:
            return None if self.entries_written is None else self.entries_written == 0
        if self.entries_written is None:
            return None
        in_flight = self.wrk_calls * wrk.CONNECTIONS + self.timeouts
        return self.acknowledged <= self.entries_written <= self.acknowledged + in_flight

    @property
    def target_met(self) -> bool | None:
        if not self.ran or not self.scenario.has_target:
            return None
        return self.scenario.target_met(self.median(_rps), self.median(_p99))

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.name,
            "workers": self.workers,
            "runs": [r.to_json() for r in self.runs],
            "acknowledged": self.acknowledged,
            "entries_written": self.entries_written,
            "entries_consistent": self.entries_consistent,
            "audit_ok": self.audit_ok,
            "failure": self.failure,
            "server_log": self.server_log,
        }


def _rps(run: Run) -> float:
    return run.result.requests_per_s


def _p99(run: Run) -> float:
    return run.result.p99_ms


class Observer:
    """What the runner tells whoever is watching; the CLI draws it with rich."""

    def status(self, text: str) -> None:
        """A phase began (preparing, seeding, running…)."""

    def run_finished(self, label: str, run: Run | None) -> None:
        """One wrk call ended; ``run`` is None for the warm-up."""


def run_scenario(
    bench: ServiceBench,
    scenario: Scenario,
    workers: int,
    options: BenchOptions,
    observer: Observer,
) -> ScenarioResult:
    """Measure one scenario; a failure is recorded in the result, not raised."""
    return _ScenarioRun(bench, scenario, workers, options, observer).measure()


class _ScenarioRun:
    """One scenario at one worker count, from an empty database to the audit."""

    def __init__(
        self,
        bench: ServiceBench,
        scenario: Scenario,
        workers: int,
        options: BenchOptions,
        observer: Observer,
    ) -> None:
        self.bench, self.workload = bench, bench.workload
        self.scenario, self.options, self.observer = scenario, options, observer
        self.label = f"{scenario.name}-w{workers}"
        options.work_dir.mkdir(parents=True, exist_ok=True)
        self.log = options.work_dir / f"{self.label}.log"
        self.log.unlink(missing_ok=True)
        self.result = ScenarioResult(scenario, workers, server_log=str(self.log))

    def status(self, text: str) -> None:
        self.observer.status(f"{self.label}: {text}")

    def measure(self) -> ScenarioResult:
        try:
            self._prepare_and_drive()
        except (stage.StageError, wrk.WrkOutputError, OSError) as exc:
            self.result.failure = str(exc)
        return self.result

    def _prepare_and_drive(self) -> None:
        options, log = self.options, self.log
        self.status(f"fresh {self.scenario.backend.value} database")
        url = stage.fresh_database(
            self.scenario.backend, self.label, options.work_dir, options.postgres_url
        )
        command, key = self._install(url)
        env = {**options.server_env(), **dict(self.result.scenario.env)}
        server = stage.Server(command, url, self.result.workers, env, log, cpus=options.server_cpus)
        try:
            with server:
                self._drive(server, key, url)
        except (stage.StageError, wrk.WrkOutputError) as exc:
            raise stage.StageError(f"{exc} ({server.exit_note()})") from exc
        if self.scenario.app is None:
            self.status("checking the database")
            written = self.workload.count_writes(url)
            if written is not None:
                self.result.entries_written = written - self.result.entries_before
            self.result.audit_ok = self.workload.audit(url, log)

    def _install(self, url: str) -> tuple[list[str], str]:
        """Migrate the fresh database and make an admin key; the command that serves it."""
        if self.scenario.app is not None:
            return ["bench", "reference", self.scenario.app], stage.core_key(url)
        service = self.bench.service
        return ["serve", service], stage.install_service(service, url, self.log)

    def _drive(self, server: stage.Server, key: str, url: str) -> None:
        options, result = self.options, self.result
        self.status(f"starting {result.workers} worker(s)")
        server.wait_ready()
        script = options.work_dir / f"{self.label}.lua"
        script.write_text(self._script(server, key, url))
        self.status(f"warm-up {options.warmup_s:g} s")
        _record(result, self._one_run(server, script, options.warmup_s))
        self.observer.run_finished(self.label, None)
        for n in range(1, options.runs + 1):
            self.status(f"run {n}/{options.runs}")
            run = self._one_run(server, script, options.duration_s)
            _record(result, run)
            result.runs.append(run)
            self.observer.run_finished(self.label, run)
        self.status("stopping the server")

    def _script(self, server: stage.Server, key: str, url: str) -> str:
        """Seed the service (reference rows need nothing) and write its wrk script."""
        if self.scenario.app is not None:
            return REFERENCE_LUA.format(name=self.scenario.name, key=key)
        self.status(f"seeding {self.options.seed:,} {self.bench.seeded}")
        ids = self.workload.seed(server.base_url, key, self.options.seed)
        self.result.entries_before = self.workload.count_writes(url) or 0
        return self.workload.lua_script(self.scenario, ids, key)

    def _one_run(self, server: stage.Server, script: Path, duration_s: float) -> Run:
        database = stage.postgres_database_name(server.database_url)
        before = sample_cpu(server.pid, database, time.monotonic())
        with pinned(self.options.wrk_cpus):
            outcome = wrk.run_wrk(server.base_url, script, duration_s, self.log)
        after = sample_cpu(server.pid, database, time.monotonic())
        return Run(outcome, cpu_between(before, after))


def _record(result: ScenarioResult, run: Run) -> None:
    result.acknowledged += run.result.succeeded
    result.timeouts += run.result.socket_errors
    result.wrk_calls += 1


def postgres_reachable(options: BenchOptions) -> str | None:
    """None if PostgreSQL answers at the bench's URL, else why not."""
    try:
        asyncio.run(stage.postgres_version(options.postgres_url))
    except Exception as exc:  # any failure means: skip its scenarios, say why
        return f"PostgreSQL unreachable at {options.postgres_url}: {type(exc).__name__}: {exc}"
    return None


def needs_postgres(backends: list[Backend]) -> bool:
    return Backend.POSTGRES in backends
