"""Engines and transactions, the same code on SQLite and PostgreSQL.

SQLite rules (the embedded default): WAL, ``busy_timeout``, ``foreign_keys=ON``, and every write
transaction opens with ``BEGIN IMMEDIATE`` so it queues for the write lock up front instead of
failing with SQLITE_BUSY when a deferred transaction later tries to write.

One place owns each transaction: :meth:`Database.write` or :meth:`Database.read` in a route (or the
posting batcher); services receive the connection and never commit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from keel.core.settings import ServiceSettings

_WRITE = "keel_write"


def async_url(url: str) -> str:
    """Accept a plain or driver-qualified URL and return the async driver's form."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise ValueError(f"unsupported database {backend!r}: use sqlite:// or postgresql://")
    return parsed.render_as_string(hide_password=False)


def _prepare_sqlite_file(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def create_engine(url: str, settings: ServiceSettings | None = None) -> AsyncEngine:
    """Build the async engine for ``url`` with keel's SQLite rules applied."""
    url = async_url(url)
    pool_size = settings.db_pool_size if settings else 10
    if url.startswith("sqlite"):
        _prepare_sqlite_file(url)
        engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)
        _apply_sqlite_rules(engine, settings or ServiceSettings())
        return engine
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def _apply_sqlite_rules(engine: AsyncEngine, settings: ServiceSettings) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Take BEGIN out of the driver's hands so we choose DEFERRED or IMMEDIATE ourselves.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(settings.sqlite_busy_timeout_ms)}")
        cursor.execute(f"PRAGMA synchronous={settings.sqlite_synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """One service's engine, with the two kinds of transaction keel uses."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._write_engine = engine.execution_options(**{_WRITE: True})

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> Database:
        return cls(create_engine(settings.database_url, settings))

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction: commits if the block succeeds, rolls back if it raises."""
        async with self._write_engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction (a consistent snapshot on both engines)."""
        async with self.engine.connect() as conn:
            yield conn  # closing the connection rolls the snapshot back

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()
