"""wrk, the load generator: its command line and its report. Services write the Lua scripts."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

THREADS = 2
CONNECTIONS = 64


@dataclass(frozen=True)
class WrkResult:
    """One wrk run, as wrk reported it. Latencies in milliseconds."""

    requests: int
    duration_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    @property
    def succeeded(self) -> int:
        return self.requests - self.non_2xx

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class WrkOutputError(ValueError):
    """wrk printed something the parser does not understand."""


_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_TIME = r"([\d.]+)(us|ms|s|m|h)"
_REQUESTS = re.compile(r"^\s*(\d+) requests in " + _TIME, re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", re.M)
_SOCKET = re.compile(
    r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.M
)


def _percentile(text: str, pct: int) -> float:
    found = re.search(rf"^\s*{pct}(?:\.0+)?%\s+{_TIME}", text, re.M)
    if found is None:
        raise WrkOutputError(f"no {pct}% latency line (was wrk run with --latency?)")
    return float(found[1]) * _TIME_UNITS_MS[found[2]]


def parse_output(text: str) -> WrkResult:
    """Read wrk's ``--latency`` report."""
    requests, rps = _REQUESTS.search(text), _RPS.search(text)
    if requests is None or rps is None:
        raise WrkOutputError("no request count or Requests/sec line in wrk's output")
    non_2xx = _NON_2XX.search(text)
    socket = _SOCKET.search(text)
    return WrkResult(
        requests=int(requests[1]),
        duration_s=float(requests[2]) * _TIME_UNITS_MS[requests[3]] / 1000,
        requests_per_s=float(rps[1]),
        p50_ms=_percentile(text, 50),
        p99_ms=_percentile(text, 99),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in socket.groups()) if socket else 0,
    )


def wrk_path() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise FileNotFoundError(
            "wrk is not on PATH: `make bench` installs it (apt-get install wrk)"
        )
    return found


def wrk_version() -> str:
    done = subprocess.run(  # noqa: S603 - a fixed argument list
        [wrk_path(), "-v"], capture_output=True, text=True, check=False
    )
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else "wrk (unknown version)"


def run_wrk(url: str, script: Path, duration_s: float, log: Path) -> WrkResult:
    """One run of wrk against ``url``; its report is appended to ``log`` as well."""
    command = [
        wrk_path(),
        f"-t{THREADS}",
        f"-c{CONNECTIONS}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(  # noqa: S603 - a fixed argument list
        command, capture_output=True, text=True, check=False, timeout=duration_s + 60
    )
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise WrkOutputError(f"wrk exited {done.returncode}: {done.stderr.strip()[:500]}")
    return parse_output(done.stdout)
