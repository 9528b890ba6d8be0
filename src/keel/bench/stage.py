"""Everything around the load: a fresh database, an admin key, the server process, and counting
rows afterwards. What is seeded and checked is the service's (its ``Workload``).

The service is driven through its own CLI (``keel db upgrade``, ``keel apikey create``,
``keel serve``) and HTTP API, so the bench measures what users run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from keel.bench.cpus import pinned
from keel.bench.scenarios import Backend


class StageError(RuntimeError):
    """The service could not be prepared, started or checked."""


def keel_command() -> list[str]:
    """The ``keel`` CLI of this very environment."""
    beside = Path(sys.executable).parent / "keel"
    found = str(beside) if beside.exists() else shutil.which("keel")
    if found is None:
        raise StageError("the keel command is not installed in this environment")
    return [found]


def run_keel(*args: str, log: Path) -> str:
    """Run one ``keel`` command; its output goes to ``log`` and stdout is returned."""
    done = subprocess.run(  # noqa: S603 - our own CLI with a fixed argument list
        [*keel_command(), *args], capture_output=True, text=True, check=False, timeout=300
    )
    with log.open("a") as out:
        out.write(f"$ keel {' '.join(args)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise StageError(f"`keel {args[0]} {args[1]}` exited {done.returncode}; see {log}")
    return done.stdout


def install_service(service: str, database_url: str, log: Path) -> str:
    """Migrate a fresh database for ``service`` and make an admin key in it; returns the key."""
    run_keel("db", "upgrade", service, "--database-url", database_url, log=log)
    return run_keel(
        "apikey", "create", "--scope", "admin", "--service", service, "--name", "bench",
        "--database-url", database_url, log=log,
    ).strip().splitlines()[-1]  # fmt: skip


def plain_postgres_url(url: str) -> str:
    """asyncpg wants ``postgresql://``; keel also accepts ``postgresql+asyncpg://``."""
    scheme, rest = url.split("://", 1)
    return f"{scheme.split('+', 1)[0]}://{rest}"


def postgres_database_name(url: str) -> str | None:
    """The database a PostgreSQL URL points at; None for SQLite."""
    if url.startswith("sqlite"):
        return None
    return urlsplit(plain_postgres_url(url)).path.lstrip("/") or None


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(plain_postgres_url(url))
    return urlunsplit(parts._replace(path=f"/{name}"))


async def postgres_version(admin_url: str) -> str:
    conn = await asyncpg.connect(plain_postgres_url(admin_url), timeout=5)
    try:
        version: str = await conn.fetchval("SHOW server_version")
        return version
    finally:
        await conn.close()


async def _recreate_postgres_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(plain_postgres_url(admin_url), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_postgres_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(plain_postgres_url(admin_url), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def drop_database(database_url: str, admin_url: str) -> None:
    """Drop a PostgreSQL database the bench made (one of millions of rows is worth the space)."""
    name = postgres_database_name(database_url)
    if name:
        asyncio.run(_drop_postgres_database(admin_url, name))


@contextmanager
def scratch_postgres(label: str, work_dir: Path, postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one probe, dropped when the block ends, however it ends
    (a probe's millions of rows are worth the space)."""
    url = fresh_database(Backend.POSTGRES, label, work_dir, postgres_url)
    try:
        yield url
    finally:
        drop_database(url, postgres_url)


def fresh_database(backend: Backend, label: str, work_dir: Path, postgres_url: str) -> str:
    """An empty database for one scenario: a new SQLite file, or a new PostgreSQL database."""
    if backend is Backend.SQLITE:
        path = (work_dir / f"{label}.db").resolve()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return f"sqlite:///{path}"
    name = "keel_bench_" + label.replace("-", "_")
    asyncio.run(_recreate_postgres_database(postgres_url, name))
    return _with_database(postgres_url, name)


def count_rows(database_url: str, query: str) -> int:
    """The integer a ``SELECT count(*) …`` returns, read from the database itself."""
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.split(":///", 1)[1]) as conn:
            return int(conn.execute(query).fetchone()[0])

    async def count() -> int:
        conn = await asyncpg.connect(plain_postgres_url(database_url), timeout=10)
        try:
            return int(await conn.fetchval(query))
        finally:
            await conn.close()

    return asyncio.run(count())


def fetch_rows(database_url: str, query: str) -> list[tuple[Any, ...]]:
    """The rows a read-only query returns, read from the database itself."""
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.split(":///", 1)[1]) as conn:
            return [tuple(row) for row in conn.execute(query).fetchall()]

    async def fetch() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(plain_postgres_url(database_url), timeout=10)
        try:
            return [tuple(row) for row in await conn.fetch(query)]
        finally:
            await conn.close()

    return asyncio.run(fetch())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _core_key(database_url: str) -> str:
    from keel.core import migrate
    from keel.core.auth import Scope, create_api_key
    from keel.core.database import Database, create_engine

    await migrate.upgrade(database_url, [])
    database = Database(create_engine(database_url))
    try:
        async with database.write() as conn:
            return await create_api_key(conn, scope=Scope.ADMIN, name="bench")
    finally:
        await database.dispose()


def core_key(database_url: str) -> str:
    """The core tables and an admin key in them: all a reference app needs."""
    return asyncio.run(_core_key(database_url))


class Server:
    """A serving ``keel`` command (``serve <service>``, ``bench reference <app>``) as a child
    process in its own session, stopped with SIGINT."""

    def __init__(
        self,
        command: list[str],
        database_url: str,
        workers: int,
        env: dict[str, str],
        log: Path,
        port: int = 0,
        cpus: frozenset[int] | None = None,
    ) -> None:
        self.command = command
        self.database_url = database_url
        self.cpus = cpus
        self.workers = workers
        self.env = env
        self.log = log
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.exited_early: int | None = None  # its exit status, if it ended before stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> Server:
        args = [*self.command, "--port", str(self.port), "--workers", str(self.workers)]
        args += ["--database-url", self.database_url]
        with self.log.open("ab") as out, pinned(self.cpus):
            self.process = subprocess.Popen(  # noqa: S603 - our own CLI
                [*keel_command(), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,  # a Ctrl-C reaches it once, through stop()
            )
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is not None:
            self.exited_early = self.process.poll()
        self.stop()

    def exit_note(self) -> str:
        """How the server ended, for an error message: killed from outside, crashed, or not."""
        code = self.exited_early
        if code is None:
            return "the server was still running"
        if code < 0:
            return f"the server was killed by signal {-code} from outside the bench"
        return f"the server exited {code} on its own; see {self.log}"

    def wait_ready(self, deadline_s: float = 60.0) -> None:
        """Poll ``GET /ready`` until it answers 200, the process dies, or the deadline passes."""
        assert self.process is not None
        give_up = time.monotonic() + deadline_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < give_up:
                if self.process.poll() is not None:
                    raise StageError(f"the server exited {self.process.returncode}; see {self.log}")
                try:
                    if client.get(f"{self.base_url}/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise StageError(f"the server was not ready within {deadline_s:g} s; see {self.log}")

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGINT, wait for a graceful shutdown, and kill the session only if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(10)
