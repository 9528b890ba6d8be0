"""A real ``keel serve <service>`` as a child process: started, probed, stopped or killed.

For what proves a service against real processes (``keel prove …``, and the test suite's live
servers, built on this): the server runs in its own session, so its process group holds
uvicorn's supervisor and every worker, and :meth:`ServiceProcess.kill` can ``kill -9`` them all
at once, as a power cut or the OOM killer would; every stop waits until no live process of the
group is left. Readiness is polled against a deadline, never slept for: first ``GET /ready``,
then until every worker process has answered a request (each writes its own Prometheus file,
named after its pid, the first time it counts one), so a load fired afterwards really races in
``workers`` processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx
from prometheus_client.mmap_dict import MmapedDict

POLL_SECONDS = 0.05
_PID_FILE = re.compile(r"_(\d+)\.db$")
# Settings a developer's shell may carry that would point a server somewhere else.
_KEEL_SETTING = re.compile(r"^KEEL_(?!TEST_)")


class ServerError(RuntimeError):
    """The server did not start, or did not stop, as asked."""


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = POLL_SECONDS
) -> None:
    """Poll ``condition`` until it holds; raise after ``timeout`` seconds saying ``what`` lagged."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def keel_command() -> list[str]:
    """``keel`` as ``python -c``: the same CLI entry point as the console script.

    Not the script itself: uvicorn spawns its workers with multiprocessing's "spawn", which
    re-imports the parent's main *file* in every worker before it can answer the supervisor's
    health check. Through the script that file imports the whole CLI (seconds of CPU on a busy
    two-core machine), the check times out, and the supervisor respawns the worker again and
    again. A ``-c`` main has no file to re-import.
    """
    return [sys.executable, "-c", "from keel.cli import app; app()"]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # comm may hold spaces and parentheses
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


@dataclass
class ServiceProcess:
    """One ``keel serve <service> --workers N`` on a free local port; its log in ``workdir``.

    ``env`` is added to this process's environment, without its ``KEEL_*`` settings when
    ``inherit_settings`` is off (a test's server must not follow the developer's shell).
    """

    service: str
    database_url: str
    workdir: Path
    workers: int = 1
    env: Mapping[str, str] = field(default_factory=dict)
    inherit_settings: bool = True
    port: int = 0
    starts: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.service}-{self.port}-{self.starts}.log"

    @property
    def metrics_dir(self) -> Path:
        return self.workdir / f"metrics-{self.port}-{self.starts}"

    def start(self, timeout: float = 120.0) -> ServiceProcess:
        """Start, and return once every worker answers requests."""
        if self.process is not None:
            raise ServerError("already running")
        for attempt in range(3):
            try:
                return self._start_once(timeout)
            except ServerError as exc:
                # Another process took the free port between our probe and the server's bind.
                if "address already in use" not in str(exc).lower() or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> ServiceProcess:
        self.starts += 1
        self.port = free_port()
        self.metrics_dir.mkdir(parents=True)
        inherited = {
            name: value
            for name, value in os.environ.items()
            if self.inherit_settings or not _KEEL_SETTING.match(name)
        }
        env = {
            **inherited,
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        command = [*keel_command(), "serve", self.service, "--workers", str(self.workers)]
        command += ["--port", str(self.port), "--database-url", self.database_url]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own CLI, fixed arguments
                command,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + timeout
            with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
                wait_until(lambda: self._ready(client), timeout, f"{self.base_url}/ready")
            left = max(1.0, deadline - time.monotonic())
            wait_until(self._all_workers_served, left, f"{self.workers} workers to serve")
        except BaseException:
            self.kill()
            raise
        return self

    def _ready(self, client: httpx.Client) -> bool:
        self._check_alive()
        try:
            return client.get("/ready").status_code == 200
        except httpx.TransportError:
            return False

    def _all_workers_served(self) -> bool:
        self._check_alive()

        def probe(_: int) -> None:  # fresh connections, so the kernel spreads them over workers
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"{self.base_url}/health", timeout=2.0)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(probe, range(4 * self.workers)))
        # Counted answers, not metrics files: a worker writes its files as it imports the app,
        # before it listens, and until it listens the kernel sends its share to the others.
        served = self.requests_served("GET", "/health")
        return len(served.keys() & set(self.members())) >= self.workers

    def worker_pids(self) -> set[int]:
        """Pids of the live worker processes (each writes its metrics from start-up on)."""
        found = (_PID_FILE.search(path.name) for path in self.metrics_dir.iterdir())
        return {int(match.group(1)) for match in found if match} & set(self.members())

    def members(self) -> list[int]:
        return [] if self.process is None else group_members(self.process.pid)

    def requests_served(self, method: str, route: str) -> dict[int, float]:
        """Requests each process has served on ``route`` since this start, by pid (from the
        Prometheus files each writes; a process counts a request just after answering it)."""
        served: dict[int, float] = {}
        for path in self.metrics_dir.glob("counter_*.db"):
            match = _PID_FILE.search(path.name)
            if not match:
                continue
            values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
            for key, value, _timestamp, _pos in values:
                _metric, name, labels, _help = json.loads(key)
                if (
                    name == "keel_http_requests_total"
                    and labels.get("method") == method
                    and labels.get("route") == route
                ):
                    pid = int(match.group(1))
                    served[pid] = served.get(pid, 0.0) + value
        return served

    def wait_requests_served(
        self, method: str, route: str, before: dict[int, float], count: int, timeout: float = 10.0
    ) -> dict[int, float]:
        """Wait until ``count`` more requests on ``route`` are counted; return each pid's share.

        A worker counts a request just after sending its reply, so a client can see the reply
        a moment before the count moves.
        """

        def delta() -> dict[int, float]:
            now = self.requests_served(method, route)
            return {
                pid: n - before.get(pid, 0.0) for pid, n in now.items() if n > before.get(pid, 0)
            }

        wait_until(lambda: sum(delta().values()) >= count, timeout, f"{count} {method} {route}")
        return delta()

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise ServerError(
                f"keel serve exited with {self.process.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM, a graceful shutdown, and SIGKILL for whatever lingers; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        code = self.process.returncode
        self.kill()
        return code

    def kill(self) -> None:
        """``kill -9`` every process of the server at once, and wait until none is left."""
        if self.process is None:
            return
        pgid = self.process.pid  # a session leader's group id is its pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait(10)
        wait_until(lambda: not group_members(pgid), 10, f"every process of group {pgid} to end")
        self.process = None

    def restart(self, timeout: float = 120.0) -> ServiceProcess:
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> ServiceProcess:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
