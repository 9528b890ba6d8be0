"""A real ``keel serve`` in its own process group, started, probed, stopped or killed by tests.

Uvicorn's ``--workers N`` forks a supervisor and N worker processes. The server is started in a
new session (``start_new_session=True``), so its process group holds all of them and
:meth:`LiveServer.kill` can ``kill -9`` the lot at once, the way a power cut or the OOM killer
would. Every stop waits until no live process of the group is left, so no test leaks a server.
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
# Settings a developer's shell may carry that would point the server somewhere else.
_INHERITED_KEEL = re.compile(r"^KEEL_(?!TEST_)")


class ServerError(RuntimeError):
    """The server did not start, or did not stop, as asked."""


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = POLL_SECONDS
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds saying ``what`` lagged."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
        # "pid (comm) state ppid pgrp ..."; comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _keel_command() -> list[str]:
    """``keel`` as ``python -c``: the same CLI entry point as the console script.

    Not the console script itself: uvicorn spawns its workers with multiprocessing's "spawn",
    which re-imports the parent's main *file* in every worker before the worker can answer the
    supervisor's health check. Through the script that file imports the whole CLI (seconds of
    CPU on a busy two-core machine), the check times out after 5 s, and the supervisor kills and
    respawns the worker again and again. A ``-c`` main has no file to re-import. (Reported:
    ``keel serve`` itself should give uvicorn a longer ``timeout_worker_healthcheck``.)
    """
    return [sys.executable, "-c", "from keel.cli import app; app()"]


@dataclass
class LiveServer:
    """One ``keel serve <service>`` process tree listening on a free local port."""

    database_url: str
    workdir: Path
    workers: int = 1
    service: str = "ledger"
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"server-{self.starts}.log"

    @property
    def metrics_dir(self) -> Path:
        return self.workdir / f"metrics-{self.starts}"

    def start(self, timeout: float = 120.0) -> LiveServer:
        """Start the server and return once every worker process answers requests."""
        if self.process is not None:
            raise ServerError("already running")
        for attempt in range(3):
            try:
                return self._start_once(timeout)
            except ServerError as exc:
                # The free port was taken between our probe and the server's bind: try another.
                if "address already in use" not in str(exc).lower() or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> LiveServer:
        self.starts += 1
        self.port = free_port()
        self.metrics_dir.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not _INHERITED_KEEL.match(k)}
        env.update(
            {
                "KEEL_RATE_LIMIT": "1000000/second",
                "KEEL_ACCESS_LOG": "false",
                "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
                "PYTHONUNBUFFERED": "1",
                **self.env,
            }
        )
        command = [
            *_keel_command(),
            "serve",
            self.service,
            "--workers",
            str(self.workers),
            "--port",
            str(self.port),
            "--database-url",
            self.database_url,
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_serving(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            wait_until(lambda: self._ready(client), timeout, f"{self.base_url}/ready == 200")
        # /ready answering proves one worker is up; concurrency tests need all of them.
        remaining = max(1.0, deadline - time.monotonic())
        wait_until(self._all_workers_served, remaining, f"all {self.workers} workers to serve")

    def _ready(self, client: httpx.Client) -> bool:
        self._check_alive()
        try:
            return client.get("/ready").status_code == 200
        except httpx.TransportError:
            return False

    def _all_workers_served(self) -> bool:
        """True once ``workers`` distinct processes have served a request.

        Each worker writes its own Prometheus files, named after its pid, to the multiprocess
        directory the first time it counts a request; so fire a burst on fresh connections and
        count the pids.
        """
        self._check_alive()

        def probe(_: int) -> None:
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"{self.base_url}/health", timeout=2.0)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(probe, range(4 * self.workers)))
        return len(self.worker_pids()) >= self.workers

    def worker_pids(self) -> set[int]:
        """The pids of the server's processes that have served at least one request."""
        pids = set()
        for path in self.metrics_dir.iterdir():
            match = _PID_FILE.search(path.name)
            if match:
                pids.add(int(match.group(1)))
        return pids & set(self.members())

    def requests_served(self, method: str, route: str) -> dict[int, float]:
        """Requests each worker process has served on ``route``, by pid, from its metrics file."""
        served: dict[int, float] = {}
        for path in self.metrics_dir.glob("counter_*.db"):
            match = _PID_FILE.search(path.name)
            if not match:
                continue
            for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):
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
        self,
        method: str,
        route: str,
        before: dict[int, float],
        count: int,
        timeout: float = 10.0,
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

    def members(self) -> list[int]:
        return [] if self.process is None else group_members(self.process.pid)

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise ServerError(
                f"server exited with {self.process.returncode} while starting:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> int | None:
        """Ask the server to shut down (SIGTERM), wait, and SIGKILL the group if it lingers."""
        if self.process is None:
            return None
        process = self.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout)
        code = process.returncode
        self._kill_group(process)
        return code

    def kill(self) -> None:
        """``kill -9`` every process of the server at once, as a crash would."""
        if self.process is not None:
            self._kill_group(self.process)

    def _kill_group(self, process: subprocess.Popen[bytes]) -> None:
        pgid = process.pid  # a session leader's pgid is its pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        process.wait(10)
        wait_until(lambda: not group_members(pgid), 10, f"every process of group {pgid} to die")
        self.process = None

    def restart(self, timeout: float = 120.0) -> LiveServer:
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> LiveServer:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
