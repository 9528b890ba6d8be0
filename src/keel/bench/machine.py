"""What the numbers were measured on, and where the CPU time went during a run (Linux /proc)."""

from __future__ import annotations

import asyncio
import os
import platform
import resource
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

from keel.bench.stage import postgres_version
from keel.bench.wrk import wrk_version

_PROC = Path("/proc")


def _cpu_model() -> str:
    try:
        for line in (_PROC / "cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in (_PROC / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from PATH is the point
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()


def describe_machine(postgres_url: str | None) -> dict[str, str]:
    """The facts a reader needs to compare these numbers with others."""
    pg = "not used"
    if postgres_url:
        try:
            pg = asyncio.run(postgres_version(postgres_url))
        except Exception as exc:  # reported in the results, not fatal
            pg = f"unreachable ({type(exc).__name__})"
    load = ", ".join(f"{n:.2f}" for n in os.getloadavg())
    return {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count() or 0),
        "memory": f"{_memory_gib():.1f} GiB",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "SQLite": sqlite3.sqlite_version,
        "PostgreSQL": pg,
        "load generator": wrk_version(),
        "keel commit": _git_commit(),
        "load average before the bench": load,
    }


def _ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def _cpu_ticks(stat: Path) -> tuple[int, int] | None:
    """(session id, utime + stime ticks) of one process, or None if it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None  # the process ended while we looked
    return int(fields[3]), int(fields[11]) + int(fields[12])


def _cmdline_has(proc: Path, marker: bytes) -> bool:
    try:
        return marker in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def server_and_database_ticks(
    session_id: int, database: str | None
) -> tuple[dict[int, int], dict[int, int]]:
    """CPU ticks so far, per process, of the server (every process of its session) and, on
    PostgreSQL, of the backends serving ``database`` (their title names the database)."""
    server: dict[int, int] = {}
    db: dict[int, int] = {}
    marker = f" {database} ".encode() if database else None
    for proc in _PROC.glob("[0-9]*"):
        found = _cpu_ticks(proc / "stat")
        if found is None:
            continue
        session, ticks = found
        if session == session_id:
            server[int(proc.name)] = ticks
        elif marker is not None and _cmdline_has(proc, marker):
            db[int(proc.name)] = ticks
    return server, db


def _seconds_between(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds the processes alive at the end used in between (a process that started in
    between counts from zero; one that ended is lost, so this errs low, never negative)."""
    return sum(ticks - before.get(pid, 0) for pid, ticks in after.items()) / _ticks()


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, every process included."""
    values = [int(v) for v in (_PROC / "stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return (total - idle) / _ticks(), total / _ticks()


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children: around one wrk call, wrk's own."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class CpuSample:
    server: dict[int, int]
    database: dict[int, int]
    children: float
    machine_busy: float
    machine_total: float
    wall: float


def sample_cpu(server_session: int, database: str | None, wall: float) -> CpuSample:
    """Where CPU time has gone so far; ``database`` names a PostgreSQL database to follow."""
    server, db = server_and_database_ticks(server_session, database)
    busy, total = machine_cpu_seconds()
    return CpuSample(server, db, children_cpu_seconds(), busy, total, wall)


@dataclass(frozen=True)
class CpuUse:
    """Cores used on average over one run: by the server, by PostgreSQL's backends serving it,
    by wrk, and by everything else."""

    server_cores: float
    database_cores: float
    wrk_cores: float
    machine_busy_cores: float

    @property
    def other_cores(self) -> float:
        """Other people's work on a shared machine, and the kernel's: the noise in a number."""
        ours = self.server_cores + self.database_cores + self.wrk_cores
        return max(0.0, self.machine_busy_cores - ours)


def cpu_between(before: CpuSample, after: CpuSample) -> CpuUse:
    wall = max(after.wall - before.wall, 1e-9)
    return CpuUse(
        server_cores=_seconds_between(before.server, after.server) / wall,
        database_cores=_seconds_between(before.database, after.database) / wall,
        wrk_cores=(after.children - before.children) / wall,
        machine_busy_cores=(after.machine_busy - before.machine_busy) / wall,
    )
