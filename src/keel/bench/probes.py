"""Measurements that are not wrk against one route: a backlog drained, memory under load.

A service's :class:`~keel.bench.scenarios.ServiceBench` may declare probes beside its scenarios.
Each probe measures itself with the stage's pieces (a fresh database, the server as users run
it), and returns one or more :class:`Finding` rows; the results page gives them a table of
their own, since their rates are not requests per second.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keel.bench.scenarios import Backend

if TYPE_CHECKING:
    from keel.bench.runner import BenchOptions, Observer

_PROC = Path("/proc")


@dataclass(frozen=True)
class Finding:
    """One row of a probe's table: a rate, what it is of, and the target it is held against."""

    name: str
    rate: float  # items/s, or 0 where the row is not a rate (memory)
    result: str  # the headline, e.g. "2,000,000 events in 17.2 s" or "212 MB"
    detail: str  # everything else a reader needs to trust it
    cpu: str  # where the CPU went, e.g. "server 0.95 / db 0.81 / redis 0.12 cores; 9.4 µs/event"
    target: str  # in words; "" when the row has none
    met: bool | None  # None: no target
    checks_ok: bool | None = None  # the probe's own consistency check (every event stored once)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ProbeContext:
    """What a probe gets from the runner: where to work, with how many workers, how to report."""

    label: str
    workers: int
    options: BenchOptions
    log: Path
    status: Callable[[str], None]


@dataclass(frozen=True)
class Probe:
    name: str
    backend: Backend
    summary: str
    # "module:function" taking a ProbeContext and returning its findings; imported only when the
    # probe runs, so declaring one costs ``keel --help`` nothing.
    measure: str
    default_workers: int = 1

    def measurer(self) -> Callable[[ProbeContext], list[Finding]]:
        module, _, function = self.measure.partition(":")
        found: Callable[[ProbeContext], list[Finding]] = getattr(
            importlib.import_module(module), function
        )
        return found


class ProbeSkipped(Exception):
    """Raised by a probe whose service is not there (no Redis on this machine): skipped, said
    why, as scenarios are without PostgreSQL; not a failure of the bench."""


@dataclass
class ProbeResult:
    probe: Probe
    workers: int
    findings: list[Finding] = field(default_factory=list)
    failure: str | None = None
    log: str = ""
    skipped: bool = False

    @property
    def ran(self) -> bool:
        return bool(self.findings)

    def to_json(self) -> dict[str, Any]:
        return {
            "probe": self.probe.name,
            "workers": self.workers,
            "findings": [f.to_json() for f in self.findings],
            "failure": self.failure,
            "log": self.log,
        }


def run_probe(probe: Probe, workers: int, options: BenchOptions, observer: Observer) -> ProbeResult:
    """Measure one probe; a failure is recorded in the result, not raised."""
    label = f"{probe.name}-w{workers}"
    options.work_dir.mkdir(parents=True, exist_ok=True)
    log = options.work_dir / f"{label}.log"
    log.unlink(missing_ok=True)
    result = ProbeResult(probe, workers, log=str(log))

    def status(text: str) -> None:
        observer.status(f"{label}: {text}")

    try:
        result.findings = probe.measurer()(ProbeContext(label, workers, options, log, status))
    except ProbeSkipped as skipped:
        result.failure, result.skipped = f"skipped: {skipped}", True
    except Exception as exc:  # a probe owns its set-up end to end: any failure is its result
        result.failure = f"{type(exc).__name__}: {exc}"
    observer.run_finished(label, None)
    return result


def session_rss_bytes(session_id: int) -> dict[int, int]:
    """Resident memory of every process of a session (the server and its workers), by pid."""
    found: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for proc in _PROC.glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[3]) != session_id:
                continue
            found[int(proc.name)] = int((proc / "statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue  # ended while we looked
    return found


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process so far (None if it is not ours to read, or gone)."""
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
