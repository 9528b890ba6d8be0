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


def session_cpu_seconds(session_id: int) -> float:
    """CPU seconds used so far by every live process in one session (a server and its workers)."""
    total = 0
    for stat in _PROC.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[3]) == session_id:
            total += int(fields[11]) + int(fields[12])
    return total / _ticks()


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
    server: float
    children: float
    machine_busy: float
    machine_total: float
    wall: float


def sample_cpu(server_session: int, wall: float) -> CpuSample:
    busy, total = machine_cpu_seconds()
    return CpuSample(session_cpu_seconds(server_session), children_cpu_seconds(), busy, total, wall)


@dataclass(frozen=True)
class CpuUse:
    """Cores used on average over one run: by the server, by wrk, and by everything else."""

    server_cores: float
    wrk_cores: float
    machine_busy_cores: float

    @property
    def other_cores(self) -> float:
        """Other people's work on a shared machine, and the kernel's: the noise in a number."""
        return max(0.0, self.machine_busy_cores - self.server_cores - self.wrk_cores)


def cpu_between(before: CpuSample, after: CpuSample) -> CpuUse:
    wall = max(after.wall - before.wall, 1e-9)
    return CpuUse(
        server_cores=(after.server - before.server) / wall,
        wrk_cores=(after.children - before.children) / wall,
        machine_busy_cores=(after.machine_busy - before.machine_busy) / wall,
    )
