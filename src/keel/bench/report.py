"""The bench's output: a Markdown table of medians, a PNG plot, and the raw runs as JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from keel.bench import wrk
from keel.bench.probes import Finding, ProbeResult
from keel.bench.runner import BenchOptions, Run, ScenarioResult
from keel.bench.scenarios import ServiceBench

NOISY_OTHER_CORES = 0.25


def _p50(run: Run) -> float:
    return run.result.p50_ms


def _p99(run: Run) -> float:
    return run.result.p99_ms


def _rps(run: Run) -> float:
    return run.result.requests_per_s


def _server_cores(run: Run) -> float:
    return run.cpu.server_cores


def _database_cores(run: Run) -> float:
    return run.cpu.database_cores


def _wrk_cores(run: Run) -> float:
    return run.cpu.wrk_cores


def _other_cores(run: Run) -> float:
    return run.cpu.other_cores


def _server_ms_per_request(run: Run) -> float:
    """Server CPU per request: what a request costs, whatever share of the CPU the run got."""
    return 1000 * run.cpu.server_cores / max(run.result.requests_per_s, 1e-9)


def _check(value: bool | None) -> str:
    return {True: "ok", False: "**FAILED**", None: "—"}[value]


def _met(result: ScenarioResult) -> str:
    if result.target_met is None:
        return "—"
    if result.errors:
        return "no (errors)"
    return "yes" if result.target_met else "**no**"


def _errors(result: ScenarioResult) -> str:
    if not result.errors:
        return "0"
    return f"**{result.errors:,}** in {result.runs_with_errors}/{len(result.runs)} runs"


def _row(result: ScenarioResult, items: str | None = None) -> str:
    name, workers = result.scenario.name, str(result.workers)
    target = result.scenario.target_text(items or "items")
    if not result.ran:
        why = (result.failure or "not run").replace("|", "\\|").replace("\n", " ")
        blanks = 8 if items else 7
        return f"| {name} | {workers} |{' — |' * blanks} skipped: {why} | {target} | — |"
    rps = result.rps
    checks = f"audit {_check(result.audit_ok)}, entries {_check(result.entries_consistent)}"
    checks = "—" if result.scenario.app is not None else checks
    cells = [
        name,
        workers,
        f"**{result.median(_rps):,.0f}**",
        *([f"**{result.median(_rps) * result.scenario.items_per_request:,.0f}**"] if items else []),
        f"{min(rps):,.0f}-{max(rps):,.0f}",
        f"{result.median(_p50):.1f}",
        f"{result.median(_p99):.1f}",
        _errors(result),
        " / ".join(
            f"{result.median(pick):.2f}"
            for pick in (_server_cores, _database_cores, _wrk_cores, _other_cores)
        ),
        f"{result.median(_server_ms_per_request):.2f}",
        checks,
        target,
        _met(result),
    ]
    return "| " + " | ".join(cells) + " |"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _finding_row(probe: ProbeResult, finding: Finding) -> str:
    cells = [
        finding.name,
        str(probe.workers),
        f"**{finding.result}**",
        finding.detail,
        finding.cpu,
        _check(finding.checks_ok),
        finding.target or "—",
        {True: "yes", False: "**no**", None: "—"}[finding.met],
    ]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _probe_rows(probe: ProbeResult) -> list[str]:
    if probe.ran:
        return [_finding_row(probe, f) for f in probe.findings]
    why = _cell(probe.failure or "not run")
    return [f"| {probe.probe.name} | {probe.workers} | — | skipped: {why} | — | — | — | — |"]


def _probe_table(measured: list[ProbeResult]) -> list[str]:
    """The probes' own table: their results are not requests per second."""
    if not measured:
        return []
    return [
        "## Probes: what one wrk row cannot measure",
        "",
        "| measurement | workers | result | detail | CPU | checks | target | met? |",
        "|---|---:|---:|---|---|---|---|---|",
        *(row for probe in measured for row in _probe_rows(probe)),
        "",
        *(f"- `{p.probe.name}`: {p.probe.summary}." for p in _unique_probes(measured)),
        "",
    ]


def _unique_probes(measured: list[ProbeResult]) -> list[ProbeResult]:
    seen: dict[str, ProbeResult] = {}
    for p in measured:
        seen.setdefault(p.probe.name, p)
    return list(seen.values())


def markdown(
    bench: ServiceBench,
    results: list[ScenarioResult],
    machine: dict[str, str],
    options: BenchOptions,
    when: datetime,
    measured: list[ProbeResult] | None = None,
) -> str:
    """The results page: the table of medians first, then how and where it was measured."""
    name = bench.service
    items = f" | median {bench.items}/s" if bench.items else ""
    lines = [
        f"# {name} benchmark",
        "",
        f"Measured {when:%Y-%m-%d %H:%M} UTC by `keel bench {name}`."
        f" Each row is the median of {options.runs} run(s) of {options.duration_s:g} s after a"
        f" {options.warmup_s:g} s warm-up, `wrk -t{wrk.THREADS} -c{wrk.CONNECTIONS} --latency`,"
        f" against a fresh database{_seeded(bench, options)}. {bench.load_text}",
        "",
        f"| scenario | workers | median req/s{items} | min-max req/s | p50 ms | p99 ms | errors"
        " | CPU cores server / db / wrk / other | server CPU ms/req | checks | target | met? |",
        "|---|---:|---:|"
        + ("---:|" if items else "")
        + "---:|---:|---:|---:|---:|---:|---|---|---|",
        *(_row(r, bench.items) for r in results),
        "",
        *_reference_ratio(results),
        *_noise_warning(results),
        "- *errors*: non-2xx answers plus socket errors (timeouts included); a run with any is"
        " flagged and its scenario does not count as meeting its target.",
        f"- *checks*: {bench.checks_text or 'the service declares none'}; *entries*: every 2xx wrk"
        " counted is a row in the database, and"
        f" at most {wrk.CONNECTIONS} per wrk call more (requests in flight when wrk stopped).",
        "- *reference* rows: `reference-bare` is a bare ASGI handler under the same uvicorn,"
        " `reference-noop` an authenticated no-op fast route through keel's whole request path;"
        " their ratio is what keel's per-request cost leaves of the server's ceiling.",
        "- *CPU cores*: average cores busy during a run (median over runs), from /proc: the"
        " server's processes, the PostgreSQL backends serving its database (SQLite runs inside"
        " the server), wrk, and everything else on the machine (other work, the kernel)."
        " Other work on the machine makes a number noisy; *server CPU ms/req* (server cores over"
        " req/s) is the cost of one request, and moves much less with it.",
        "",
        "## Scenarios",
        "",
        *(f"- `{r.scenario.name}`: {r.scenario.summary}." for r in _unique_scenarios(results)),
        "",
        *_probe_table(measured or []),
        "## Machine",
        "",
        *(f"- {key}: {value}" for key, value in machine.items()),
        "",
        "## Server settings",
        "",
        *(f"- `{k}={v}`" for k, v in options.server_env().items()),
        "- everything else at its default (access log on, written to `bench/work/*.log`).",
        f"- CPUs: server {_cpus(options.server_cpus)}, wrk {_cpus(options.wrk_cpus)}.",
        "",
    ]
    return "\n".join(lines)


def _seeded(bench: ServiceBench, options: BenchOptions) -> str:
    return f" seeded with {options.seed:,} {bench.seeded}" if bench.seeded else ""


def _cpus(cpus: frozenset[int] | None) -> str:
    return "any (shared)" if cpus is None else ",".join(map(str, sorted(cpus)))


def _reference_ratio(results: list[ScenarioResult]) -> list[str]:
    """The no-op route's rate as a share of the bare handler's, at the same worker count."""
    bare = {r.workers: r for r in results if r.scenario.name == "reference-bare" and r.ran}
    lines = []
    for noop in (r for r in results if r.scenario.name == "reference-noop" and r.ran):
        base = bare.get(noop.workers)
        if base is not None:
            share = noop.median(_rps) / max(base.median(_rps), 1e-9)
            lines.append(
                f"**Reference, {noop.workers} worker(s):** the no-op route serves {share:.0%} of"
                " the bare handler's rate in this run."
            )
    return [*lines, ""] if lines else []


def _noise_warning(results: list[ScenarioResult]) -> list[str]:
    """Say so when other work took a real share of the machine: then the numbers are low."""
    ran = [r for r in results if r.ran]
    other = max((r.median(_other_cores) for r in ran), default=0.0)
    if other < NOISY_OTHER_CORES:
        return []
    return [
        f"**Noisy machine:** other processes kept up to {other:.2f} cores busy (median of a"
        " scenario's runs) while these were measured, so req/s and latencies understate the"
        " service; compare *server CPU ms/req* instead.",
        "",
    ]


def _unique_scenarios(results: list[ScenarioResult]) -> list[ScenarioResult]:
    seen: dict[str, ScenarioResult] = {}
    for r in results:
        seen.setdefault(r.scenario.name, r)
    return list(seen.values())


def plot(name: str, results: list[ScenarioResult], path: Path, when: datetime) -> None:
    """Bars of median req/s, whiskers for the run-to-run range, a line for each target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in results if r.ran]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(ran) + 2), 4.8), dpi=120)
    for x, r in enumerate(ran):
        median, rps = r.median(_rps), r.rps
        colour = "tab:green" if r.target_met and not r.errors else "tab:orange"
        colour = "tab:grey" if r.target_met is None and not r.errors else colour
        ax.bar(x, median, width=0.6, color=colour, alpha=0.8)
        ax.errorbar(
            x, median, yerr=[[median - min(rps)], [max(rps) - median]],
            fmt="none", ecolor="black", capsize=6,
        )  # fmt: skip
        ax.scatter([x] * len(rps), rps, s=10, color="black", zorder=3)
        if r.scenario.has_target:
            ax.hlines(r.scenario.target_rps, x - 0.4, x + 0.4, colors="tab:red", linestyles="--")
        label = f"{median:,.0f}/s"
        if r.scenario.items_per_request > 1:  # a batch's bar is short: say what it carried
            label += f"\n{median * r.scenario.items_per_request:,.0f} items/s"
        ax.annotate(label, (x, max(rps)), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 4), textcoords="offset points")  # fmt: skip
    ax.set_xticks(range(len(ran)))
    ax.set_xticklabels([f"{r.scenario.name}\n{r.workers} worker(s)" for r in ran], fontsize=8)
    ax.set_ylabel("requests/s (median; whiskers: min-max; dots: runs)")
    ax.set_title(f"keel {name}, wrk -c{wrk.CONNECTIONS} (red dashes: targets), {when:%Y-%m-%d}")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_results(
    bench: ServiceBench,
    results: list[ScenarioResult],
    machine: dict[str, str],
    options: BenchOptions,
    results_dir: Path,
    measured: list[ProbeResult] | None = None,
) -> list[Path]:
    """Write ``<service>.md``, ``<service>.png`` (if matplotlib is installed) and the raw JSON.

    The plot shows the wrk rows only; the probes' rates are of another kind (see the table)."""
    name = bench.service
    when = datetime.now(UTC)
    results_dir.mkdir(parents=True, exist_ok=True)
    written = [results_dir / f"{name}.md"]
    written[0].write_text(markdown(bench, results, machine, options, when, measured))
    raw = results_dir / f"{name}-{when:%Y%m%dT%H%M%S}.json"
    raw.write_text(
        json.dumps(
            {
                "when": when.isoformat(),
                "machine": machine,
                "server_env": options.server_env(),
                "results": [r.to_json() for r in results],
                "probes": [p.to_json() for p in measured or []],
            },
            indent=2,
        )
    )
    written.append(raw)
    if any(r.ran for r in results):
        try:
            plot(name, results, results_dir / f"{name}.png", when)
            written.append(results_dir / f"{name}.png")
        except ImportError:
            pass  # matplotlib is in the `bench` dependency group; the table stands alone
    return written
