"""``keel bench <service>``: the CLI over the runner, with rich progress.

One command per registered service that declares a bench, plus the hidden ``keel bench reference``
that serves the reference apps under keel's uvicorn options. The runner and its dependencies load
only when a bench runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from keel.clikit import console, prepare_metrics_dir, run_uvicorn

if TYPE_CHECKING:
    from keel.bench.probes import Probe, ProbeResult
    from keel.bench.runner import BenchOptions, ScenarioResult
    from keel.bench.scenarios import Scenario, ServiceBench
    from keel.registry import ServiceEntry

DEFAULT_POSTGRES_URL = os.environ.get(
    "KEEL_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def bench_app(entries: Mapping[str, ServiceEntry]) -> typer.Typer:
    """``keel bench``, with one command for each service that declares a bench."""
    app = typer.Typer(help="Benchmarks: `make bench` runs every service's in turn.")
    for entry in entries.values():
        if entry.bench is not None:
            about = f"Measure {entry.name} with wrk, beside the reference rows."
            app.command(entry.name, help=about)(_service_command(entry))
    app.command("reference", hidden=True)(serve_reference)
    return app


def serve_reference(
    factory: Annotated[str, typer.Argument(help="module:factory of a reference app.")],
    port: Annotated[int, typer.Option()] = 8999,
    workers: Annotated[int, typer.Option(min=1)] = 1,
    database_url: Annotated[str | None, typer.Option("--database-url")] = None,
) -> None:
    """Serve a reference app (keel.bench.reference) exactly as ``keel serve`` serves a service."""
    if database_url:
        os.environ["KEEL_DATABASE_URL"] = database_url
    prepare_metrics_dir(workers)
    run_uvicorn(factory, "127.0.0.1", port, workers)


def _service_command(entry: ServiceEntry) -> Callable[..., None]:
    def bench(
        scenario: Annotated[
            list[str] | None,
            typer.Option("--scenario", "-s", help="Run only these (repeatable); all by default."),
        ] = None,
        runs: Annotated[int, typer.Option(min=1, help="Measured runs per scenario.")] = 5,
        duration: Annotated[float, typer.Option(min=1, help="Seconds per run.")] = 10.0,
        warmup: Annotated[
            float, typer.Option(min=1, help="Seconds of warm-up, not counted.")
        ] = 5.0,
        workers: Annotated[
            list[int] | None,
            typer.Option(min=1, help="Server worker processes (repeatable: one row each)."),
        ] = None,
        seed: Annotated[int, typer.Option(min=1, help="Records seeded (ledger: accounts).")] = 1000,
        env: Annotated[
            list[str] | None,
            typer.Option("--env", help="NAME=VALUE server setting for every run (repeatable)."),
        ] = None,
        postgres_url: Annotated[
            str, typer.Option(help="Where to create the bench databases (CREATE DATABASE).")
        ] = DEFAULT_POSTGRES_URL,
        results_dir: Annotated[Path, typer.Option(help="Where the table and plot go.")] = Path(
            "bench/results"
        ),
        work_dir: Annotated[Path, typer.Option(help="Databases, scripts and logs.")] = Path(
            "bench/work"
        ),
        server_cpus: Annotated[
            str | None,
            typer.Option(help="Pin the server's processes to these CPUs, e.g. 0-3 (taskset)."),
        ] = None,
        wrk_cpus: Annotated[
            str | None, typer.Option(help="Pin wrk to these CPUs, e.g. 4-5: cores of its own.")
        ] = None,
    ) -> None:
        """Start the service on fresh databases, drive it with wrk, write medians, table, plot."""
        from keel.bench import wrk
        from keel.bench.runner import BenchOptions

        bench = entry.load_bench()
        assert bench is not None
        plan, probes = _plan(bench, scenario, workers)
        settings = {**bench.server_env, **_env_option(env or [])}
        wrk.wrk_path()  # fail before any set-up if the load generator is missing
        options = BenchOptions(
            runs=runs,
            duration_s=duration,
            warmup_s=warmup,
            seed=seed,
            postgres_url=postgres_url,
            work_dir=work_dir,
            extra_env=settings,
            server_cpus=_cpu_option(server_cpus, "--server-cpus"),
            wrk_cpus=_cpu_option(wrk_cpus, "--wrk-cpus"),
        )
        _run_bench(bench, plan, probes, options, results_dir)

    return bench


def _plan(
    bench: ServiceBench, names: list[str] | None, workers: list[int] | None
) -> tuple[list[tuple[Scenario, int]], list[tuple[Probe, int]]]:
    """The (scenario, workers) and (probe, workers) pairs to measure, in order."""
    known, probes = bench.all_scenarios(), bench.all_probes()
    unknown = [n for n in names or [] if n not in known and n not in probes]
    if unknown:
        raise typer.BadParameter(
            f"unknown {', '.join(unknown)}; choose from {', '.join([*known, *probes])}",
            param_hint="--scenario",
        )
    chosen = [known[n] for n in names if n in known] if names else list(known.values())
    measured = [probes[n] for n in names if n in probes] if names else list(probes.values())
    return (
        [(s, w) for s in chosen for w in (workers or [s.default_workers])],
        [(p, w) for p in measured for w in (workers or [p.default_workers])],
    )


def _env_option(pairs: list[str]) -> dict[str, str]:
    found = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--env")
        found[name] = value
    return found


def _cpu_option(text: str | None, name: str) -> frozenset[int] | None:
    from keel.bench.cpus import parse_cpus

    if text is None:
        return None
    try:
        return parse_cpus(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=name) from None


def _run_bench(
    bench: ServiceBench,
    plan: list[tuple[Scenario, int]],
    probes: list[tuple[Probe, int]],
    options: BenchOptions,
    results_dir: Path,
) -> None:
    from keel.bench.machine import describe_machine
    from keel.bench.progress import run_plan, summary
    from keel.bench.report import write_results
    from keel.bench.runner import needs_postgres, postgres_reachable

    backends = [s.backend for s, _ in plan] + [p.backend for p, _ in probes]
    no_postgres = postgres_reachable(options) if needs_postgres(backends) else None
    if no_postgres:
        console.print(f"[yellow]{no_postgres}: its scenarios are skipped")
    machine = describe_machine(None if no_postgres else options.postgres_url)
    results, measured = run_plan(bench, plan, probes, options, no_postgres, console)
    for path in write_results(bench, results, machine, options, results_dir, measured):
        console.print(f"wrote {path}")
    console.print(summary(bench.service, results, measured))
    _exit_on_failure(results, measured, no_postgres)


def _exit_on_failure(
    results: list[ScenarioResult], measured: list[ProbeResult], no_postgres: str | None
) -> None:
    broken = [
        r.scenario.name for r in results if r.audit_ok is False or r.entries_consistent is False
    ]
    broken += [f.name for p in measured for f in p.findings if f.checks_ok is False]
    failures = [(r.scenario.name, r.workers, r.failure) for r in results]
    failures += [(p.probe.name, p.workers, p.failure) for p in measured if not p.skipped]
    failed = [f for f in failures if f[2] and not (no_postgres and f[2] == no_postgres)]
    for name, workers, why in failed:
        console.print(f"[red]{name} ({workers} workers) failed: {why}")
    if broken or failed:
        raise typer.Exit(1)
