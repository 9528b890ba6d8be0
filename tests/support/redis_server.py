"""A throwaway ``redis-server`` that a test starts, stops, freezes and thaws: never the shared one.

It listens on a free port of its own, keeps nothing on disk (``--save ''``, no AOF, unless asked
for AOF with ``appendfsync always``) and runs in the test's tmp directory, so stopping or
:meth:`kill`-ing it hurts no other test; started again, it replays its AOF from that directory.
:meth:`freeze` (SIGSTOP) makes a Redis that accepts connections and never answers, the way a
stalled server does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path

from tests.support.live_server import free_port, wait_until


class PrivateRedis:
    """One redis-server process on ``port``, restartable on the same port."""

    def __init__(
        self, directory: Path, *, appendonly: bool = False, replica_of: PrivateRedis | None = None
    ) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.replica_of = replica_of
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None
        self._frozen = False

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *(
                    ["--appendonly", "yes", "--appendfsync", "always"]
                    if self.appendonly
                    else ["--appendonly", "no"]
                ),
                "--dir",
                str(self.directory),
                *(
                    ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
                    if self.replica_of
                    else []
                ),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.answers, 10, f"redis-server on port {self.port}")

    def stop(self) -> None:
        """Stop the server and wait until its port is closed."""
        process, self._process = self._process, None
        if process is None:
            return
        self._thaw(process.pid)
        process.terminate()
        process.wait(timeout=10)
        wait_until(lambda: not self._listening(), 10, f"port {self.port} to close")

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown save, only what was fsynced survives."""
        process, self._process = self._process, None
        if process is None:
            return
        process.kill()
        process.wait(timeout=10)
        self._frozen = False
        wait_until(lambda: not self._listening(), 10, f"port {self.port} to close")

    def freeze(self) -> None:
        """SIGSTOP: connections still open (the kernel accepts them), nothing is answered."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        assert self._process is not None
        self._thaw(self._process.pid)

    def _thaw(self, pid: int) -> None:
        if self._frozen:
            os.kill(pid, signal.SIGCONT)
            self._frozen = False

    def answers(self) -> bool:
        """True once the server replies to PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _listening(self) -> bool:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        return False
