"""``keel bench``: the CLI over the runner, with rich progress."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from keel.bench import wrk
from keel.bench.cpus import parse_cpus
from keel.bench.machine import describe_machine
from keel.bench.report import write_results
from keel.bench.runner import (
    BenchOptions,
    Observer,
    Run,
    ScenarioResult,
    needs_postgres,
    postgres_reachable,
    run_scenario,
)
from keel.bench.scenarios import SCENARIOS, Backend, Scenario

bench_app = typer.Typer(help="Benchmarks: `make bench` runs `keel bench ledger`.")
console = Console()

ScenarioName = StrEnum("ScenarioName", {name: name for name in SCENARIOS})  # type: ignore[misc]
DEFAULT_POSTGRES_URL = os.environ.get(
    "KEEL_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


class RichObserver(Observer):
    """Draws the runner's progress as one bar over every wrk call."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task("preparing", total=total)

    def status(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def run_finished(self, label: str, run: Run | None) -> None:
        self.progress.advance(self.task)
        if run is not None:
            r = run.result
            flag = f" [red]{r.errors} errors[/]" if r.errors else ""
            self.progress.console.print(
                f"  {label}: {r.requests_per_s:,.0f} req/s, p50 {r.p50_ms:.1f} ms,"
                f" p99 {r.p99_ms:.1f} ms, cores: server {run.cpu.server_cores:.2f},"
                f" db {run.cpu.database_cores:.2f},"
                f" wrk {run.cpu.wrk_cores:.2f}, other {run.cpu.other_cores:.2f}{flag}"
            )


def _plan(
    names: list[ScenarioName] | None, workers: list[int] | None
) -> list[tuple[Scenario, int]]:
    chosen = [SCENARIOS[n.value] for n in names] if names else list(SCENARIOS.values())
    return [(s, w) for s in chosen for w in (workers or [s.default_workers])]


def _summary(results: list[ScenarioResult]) -> Table:
    table = Table(title="ledger: medians")
    for column in ("scenario", "workers", "req/s", "p50 ms", "p99 ms", "errors", "target", "met"):
        table.add_column(column, justify="left" if column in ("scenario", "target") else "right")
    for r in results:
        if not r.ran:
            table.add_row(r.scenario.name, str(r.workers), "skipped", "", "", "", "", "")
            continue
        rps = r.median(lambda run: run.result.requests_per_s)
        p50 = r.median(lambda run: run.result.p50_ms)
        p99 = r.median(lambda run: run.result.p99_ms)
        met = "yes" if r.target_met and not r.errors else "[red]no[/]"
        table.add_row(
            r.scenario.name, str(r.workers), f"{rps:,.0f}", f"{p50:.1f}", f"{p99:.1f}",
            str(r.errors), r.scenario.target_text(), met,
        )  # fmt: skip
    return table


@bench_app.command("ledger")
def bench_ledger(
    scenario: Annotated[
        list[ScenarioName] | None,
        typer.Option("--scenario", "-s", help="Run only these (repeatable); all by default."),
    ] = None,
    runs: Annotated[int, typer.Option(min=1, help="Measured runs per scenario.")] = 5,
    duration: Annotated[float, typer.Option(min=1, help="Seconds per run.")] = 10.0,
    warmup: Annotated[float, typer.Option(min=1, help="Seconds of warm-up, not counted.")] = 5.0,
    workers: Annotated[
        list[int] | None,
        typer.Option(min=1, help="Server worker processes (repeatable: one row each)."),
    ] = None,
    accounts: Annotated[int, typer.Option(min=1, help="Accounts seeded.")] = 1000,
    postgres_url: Annotated[
        str, typer.Option(help="Where to create the bench databases (CREATE DATABASE).")
    ] = DEFAULT_POSTGRES_URL,
    outbox_worker: Annotated[
        bool, typer.Option(help="Run the outbox worker, as production does.")
    ] = True,
    results_dir: Annotated[Path, typer.Option(help="Where the table and plot go.")] = Path(
        "bench/results"
    ),
    work_dir: Annotated[Path, typer.Option(help="Databases, scripts and logs.")] = Path(
        "bench/work"
    ),
    server_cpus: Annotated[
        str | None,
        typer.Option(help="Pin the server's processes to these CPUs, e.g. 0-3 (taskset syntax)."),
    ] = None,
    wrk_cpus: Annotated[
        str | None, typer.Option(help="Pin wrk to these CPUs, e.g. 4-5: give it cores of its own.")
    ] = None,
) -> None:
    """Start the ledger on fresh databases, drive it with wrk, write medians, table and plot."""
    wrk.wrk_path()  # fail before any set-up if the load generator is missing
    options = BenchOptions(
        runs=runs,
        duration_s=duration,
        warmup_s=warmup,
        accounts=accounts,
        postgres_url=postgres_url,
        work_dir=work_dir,
        outbox_worker=outbox_worker,
        server_cpus=_cpu_option(server_cpus, "--server-cpus"),
        wrk_cpus=_cpu_option(wrk_cpus, "--wrk-cpus"),
    )
    plan = _plan(scenario, workers)
    no_postgres = postgres_reachable(options) if needs_postgres([s for s, _ in plan]) else None
    if no_postgres:
        console.print(f"[yellow]{no_postgres}: its scenarios are skipped")
    machine = describe_machine(None if no_postgres else postgres_url)
    results = _run_plan(plan, options, no_postgres)
    for path in write_results(results, machine, options, results_dir):
        console.print(f"wrote {path}")
    console.print(_summary(results))
    broken = [r for r in results if r.audit_ok is False or r.entries_consistent is False]
    failed = [r for r in results if r.failure and not (no_postgres and r.failure == no_postgres)]
    for r in failed:
        console.print(f"[red]{r.scenario.name} ({r.workers} workers) failed: {r.failure}")
    if broken or failed:
        raise typer.Exit(1)


def _cpu_option(text: str | None, name: str) -> frozenset[int] | None:
    if text is None:
        return None
    try:
        return parse_cpus(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=name) from None


def _run_plan(
    plan: list[tuple[Scenario, int]], options: BenchOptions, no_postgres: str | None
) -> list[ScenarioResult]:
    results: list[ScenarioResult] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    runnable = [p for p in plan if not (no_postgres and p[0].backend is Backend.POSTGRES)]
    with Progress(*columns, console=console) as progress:
        observer = RichObserver(progress, total=len(runnable) * (options.runs + 1))
        for scenario, count in plan:
            if no_postgres and scenario.backend is Backend.POSTGRES:
                results.append(ScenarioResult(scenario, count, failure=no_postgres))
                continue
            results.append(run_scenario(scenario, count, options, observer))
    return results
