"""Everything around the load: a fresh database, an admin key, seeded accounts, the server
process, and the checks run on the database afterwards.

The service is driven through its own CLI (``keel db upgrade``, ``keel apikey create``,
``keel serve``, ``keel ledger audit``) and HTTP API, so the bench measures what users run.
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
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from keel.bench.cpus import pinned
from keel.bench.scenarios import Backend

SEED_DEPOSIT = 1_000_000_000  # so the ±1 postings of a run can never be refused
SEED_CONCURRENCY = 32


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


def count_entries(database_url: str) -> int:
    """How many ledger entries the database holds, read from the database itself."""
    query = "SELECT count(*) FROM ledger_entries"
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


def audit_ok(database_url: str, log: Path) -> bool:
    """``keel ledger audit``: every balance equals the sum of its entries."""
    try:
        run_keel("ledger", "audit", "--database-url", database_url, log=log)
    except StageError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """``keel serve ledger`` as a child process in its own session, stopped with SIGINT."""

    def __init__(
        self,
        database_url: str,
        workers: int,
        env: dict[str, str],
        log: Path,
        port: int = 0,
        cpus: frozenset[int] | None = None,
    ) -> None:
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
        args = ["serve", "ledger", "--port", str(self.port), "--workers", str(self.workers)]
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


async def _seed(base_url: str, api_key: str, accounts: int) -> list[int]:
    headers = {"Authorization": f"Bearer {api_key}"}
    gate = asyncio.Semaphore(SEED_CONCURRENCY)
    stamp = time.time_ns()

    async def open_account(client: httpx.AsyncClient, n: int) -> int:
        async with gate:
            made = await client.post("/users", json={"username": f"bench-{stamp}-{n}"})
            if made.status_code != 201:
                raise StageError(f"POST /users answered {made.status_code}: {made.text[:200]}")
            user_id = int(made.json()["id"])
            body = {"user_id": user_id, "amount": SEED_DEPOSIT, "description": "bench seed"}
            paid = await client.post("/transactions", json=body)
            if paid.status_code != 201:
                raise StageError(f"seed deposit answered {paid.status_code}: {paid.text[:200]}")
            return user_id

    limits = httpx.Limits(max_connections=SEED_CONCURRENCY)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=30.0, limits=limits
    ) as client:
        try:
            return list(await asyncio.gather(*(open_account(client, n) for n in range(accounts))))
        except httpx.HTTPError as exc:
            raise StageError(f"seeding failed: {type(exc).__name__} {exc}") from exc


def seed_accounts(base_url: str, api_key: str, accounts: int) -> list[int]:
    """Open ``accounts`` accounts over HTTP, each with a large deposit; their ids."""
    return asyncio.run(_seed(base_url, api_key, accounts))
