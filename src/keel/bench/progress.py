"""The bench's terminal side: one rich progress bar over every wrk call, and the summary table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from keel.bench.probes import Probe, ProbeResult, run_probe
from keel.bench.runner import BenchOptions, Observer, Run, ScenarioResult, run_scenario
from keel.bench.scenarios import Backend, Scenario, ServiceBench


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


def summary(
    service: str, results: list[ScenarioResult], measured: list[ProbeResult] | None = None
) -> Table:
    table = Table(title=f"{service}: medians")
    for column in ("scenario", "workers", "req/s", "p50 ms", "p99 ms", "errors", "target", "met"):
        table.add_column(column, justify="left" if column in ("scenario", "target") else "right")
    for r in results:
        if not r.ran:
            table.add_row(r.scenario.name, str(r.workers), "skipped", "", "", "", "", "")
            continue
        rps = r.median(lambda run: run.result.requests_per_s)
        p50 = r.median(lambda run: run.result.p50_ms)
        p99 = r.median(lambda run: run.result.p99_ms)
        met = {True: "yes", False: "[red]no[/]", None: "—"}[r.target_met]
        met = "[red]no[/]" if r.errors else met
        table.add_row(
            r.scenario.name, str(r.workers), f"{rps:,.0f}", f"{p50:.1f}", f"{p99:.1f}",
            str(r.errors), r.scenario.target_text(), met,
        )  # fmt: skip
    for p in measured or []:
        if not p.ran:
            table.add_row(p.probe.name, str(p.workers), "skipped", "", "", "", "", "")
        for f in p.findings:
            met = {True: "yes", False: "[red]no[/]", None: "—"}[f.met]
            rate = f"{f.rate:,.0f}/s" if f.rate else f.result
            table.add_row(f.name, str(p.workers), rate, "", "", "", f.target or "—", met)
    return table


def run_plan(
    bench: ServiceBench,
    plan: list[tuple[Scenario, int]],
    probes: list[tuple[Probe, int]],
    options: BenchOptions,
    no_postgres: str | None,
    console: Console,
) -> tuple[list[ScenarioResult], list[ProbeResult]]:
    """Run every (scenario, workers) pair in order, then the probes; PostgreSQL ones skip when it
    is missing."""
    results: list[ScenarioResult] = []
    measured: list[ProbeResult] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    runnable = [p for p in plan if not (no_postgres and p[0].backend is Backend.POSTGRES)]
    probing = [p for p in probes if not (no_postgres and p[0].backend is Backend.POSTGRES)]
    with Progress(*columns, console=console) as progress:
        total = len(runnable) * (options.runs + 1) + len(probing)
        observer = RichObserver(progress, total=total)
        for scenario, count in plan:
            if no_postgres and scenario.backend is Backend.POSTGRES:
                results.append(ScenarioResult(scenario, count, failure=no_postgres))
                continue
            results.append(run_scenario(bench, scenario, count, options, observer))
        for probe, count in probes:
            if no_postgres and probe.backend is Backend.POSTGRES:
                measured.append(ProbeResult(probe, count, failure=no_postgres))
                continue
            measured.append(run_probe(probe, count, options, observer))
            for finding in measured[-1].findings:
                progress.console.print(f"  {finding.name}: {finding.result}; {finding.cpu}")
    return results, measured
