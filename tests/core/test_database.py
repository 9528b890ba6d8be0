"""Database URLs: plain or driver-qualified in, the async driver's form out."""

from __future__ import annotations

import asyncio
import threading

import pytest
from sqlalchemy.engine import Connection

from keel.core.database import Database, async_url


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///data/ledger.db", "sqlite+aiosqlite:///data/ledger.db"),
        ("sqlite:////abs/path/ledger.db", "sqlite+aiosqlite:////abs/path/ledger.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite+pysqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://u:p@db:5432/keel", "postgresql+asyncpg://u:p@db:5432/keel"),
        ("postgres://u:p@db:5432/keel", "postgresql+asyncpg://u:p@db:5432/keel"),
        ("postgresql+psycopg2://u@db/keel", "postgresql+asyncpg://u@db/keel"),
        ("postgresql+asyncpg://u@db/keel", "postgresql+asyncpg://u@db/keel"),
        (
            "postgresql://u@db/keel?sslmode=require",
            "postgresql+asyncpg://u@db/keel?sslmode=require",
        ),
    ],
)
def test_async_url_picks_the_async_driver(given: str, expected: str) -> None:
    assert async_url(given) == expected


def test_async_url_keeps_the_password() -> None:
    """Rendering a URL hides its password by default; the engine needs the real one."""
    assert "s3cr%40t" in async_url("postgresql://keel:s3cr%40t@db/keel")


@pytest.mark.parametrize(
    "url", ["mysql://u@db/keel", "oracle://u@db/keel", "mssql+pyodbc://u@db/keel", "redis://x"]
)
def test_async_url_refuses_other_databases(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported database"):
        async_url(url)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_write_on_a_thread_keeps_its_turn_until_the_thread_is_done(
    database: Database,
) -> None:
    """A cancelled caller of run_write(on_thread=True) must not give up the writers' lock, the
    connection or the transaction while its thread still writes: the next write would run on
    the same connection at the same time."""
    await database.run_write(lambda conn: conn.exec_driver_sql("CREATE TABLE t (x INTEGER)"))
    started, release = threading.Event(), threading.Event()

    def slow(conn: Connection) -> None:
        started.set()
        release.wait(10)
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")

    first = asyncio.create_task(database.run_write(slow, on_thread=True))
    assert await asyncio.to_thread(started.wait, 10)
    first.cancel()
    second = asyncio.create_task(
        database.run_write(lambda conn: conn.exec_driver_sql("INSERT INTO t VALUES (2)"))
    )
    finished, _ = await asyncio.wait({first, second}, timeout=0.3)
    assert not finished  # both wait for the thread: neither the cancel nor the next write jumps in
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    count = await database.run_write(
        lambda conn: conn.exec_driver_sql("SELECT group_concat(x) FROM t").scalar()
    )
    assert count == "1,2"  # the thread's write committed, then the next one
