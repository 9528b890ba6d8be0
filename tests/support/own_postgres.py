"""A throwaway PostgreSQL server of a test's own, to stop and start at will.

Tests that need an outage must never touch the machine's shared server: this one runs from
``/usr/lib/postgresql/*/bin`` on a free port with its data in a fresh temporary directory. As
root (PostgreSQL refuses to run as root) it runs as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keel.core.chains import MigrationChain
from keel.core.migrate import upgrade
from tests.support.live_server import free_port


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


@dataclass
class OwnPostgres:
    """``initdb`` + ``pg_ctl`` on a free port; :meth:`stop_hard` is ``pg_ctl -m immediate``."""

    bin_dir: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="keel-pg-")))
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def init(self) -> OwnPostgres:
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "-N")
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "server.log")
        self._run("pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", log, "-w", "start")

    def stop_hard(self) -> None:
        """Stop at once, as a crash would: no checkpoint, every connection cut."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self.stop_hard()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.asynccontextmanager
async def migrated_own_postgres(chains: Sequence[MigrationChain]) -> AsyncIterator[OwnPostgres]:
    """A private PostgreSQL, started and migrated with ``chains``; destroyed afterwards.

    Skips the test where the server binaries are missing (they are on CI's machine).
    """
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql")
    server = OwnPostgres(bin_dir).init()
    try:
        server.start()
        await upgrade(server.url, list(chains))
        yield server
    finally:
        server.destroy()
