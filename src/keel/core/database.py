"""Engines and transactions, the same code on SQLite and PostgreSQL.

SQLite rules (the embedded default): WAL, ``busy_timeout``, ``foreign_keys=ON``, and every write
transaction opens with ``BEGIN IMMEDIATE`` so it queues for the write lock up front instead of
failing with SQLITE_BUSY when a deferred transaction later tries to write.

One place owns each transaction: :meth:`Database.write` or :meth:`Database.read` in a route (or the
posting batcher); services receive the connection and never commit.

Every write transaction says what a failure means (:func:`_commit_outcome`): an error before COMMIT
was sent propagates as it is (nothing was written: the client may retry); an error while COMMIT
was in flight becomes :class:`~keel.core.errors.OutcomeUnknown`. Engines hide bound parameters
from error messages and logs, which may carry tokens or personal data.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from keel.core.errors import DatabaseUnavailable, commit_failure
from keel.core.settings import ServiceSettings

_WRITE = "keel_write"
T = TypeVar("T")


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
        # aiosqlite logs every statement with its parameters at DEBUG: keep values out of logs.
        logging.getLogger("aiosqlite").setLevel(max(logging.INFO, logging.root.level))
        engine = create_async_engine(
            url, pool_size=pool_size, max_overflow=pool_size, hide_parameters=True
        )
        _apply_sqlite_rules(engine.sync_engine, settings or ServiceSettings())
        return engine
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, hide_parameters=True
    )


def _apply_sqlite_rules(engine: Engine, settings: ServiceSettings, *, direct: bool = False) -> None:
    # The direct writer never waits inside SQLite's busy handler (it sleeps in coarse steps and
    # would block the event loop); it retries BEGIN IMMEDIATE itself. See Database.run_write.
    busy_timeout = 0 if direct else settings.sqlite_busy_timeout_ms

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Take BEGIN out of the driver's hands so we choose DEFERRED or IMMEDIATE ourselves.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout)}")
        cursor.execute(f"PRAGMA synchronous={settings.sqlite_synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
        # SQLite's lower() folds ASCII only; search promises case-insensitivity for every script.
        dbapi_connection.create_function("lower", 1, _unicode_lower, deterministic=True)

    if direct:
        return

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _unicode_lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class Database:
    """One service's engine, with the kinds of transaction keel uses."""

    def __init__(self, engine: AsyncEngine, settings: ServiceSettings | None = None) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._settings = settings or ServiceSettings()
        self._write_engine = engine.execution_options(**{_WRITE: True})
        # PostgreSQL's default, READ COMMITTED, gives each statement its own snapshot.
        snapshot = {} if self.is_sqlite else {"isolation_level": "REPEATABLE READ"}
        self._read_engine = engine.execution_options(**snapshot)
        self._direct: Connection | None = None
        self._reader: Connection | None = None
        self._lock_fd: int | None = None
        self._write_lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> Database:
        return cls(create_engine(settings.database_url, settings), settings)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def settings(self) -> ServiceSettings:
        return self._settings

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction: commits if the block succeeds, rolls back if it raises."""
        if not self.is_sqlite:
            with _commit_outcome() as commit:
                async with self._write_engine.begin() as conn:
                    yield conn
                    commit.send(conn.sync_connection)
            return
        # Every SQLite writer of this process, and of every process on the file, takes its turn.
        with _commit_outcome() as commit:
            async with self._write_lock, self._writer_turn(), self._write_engine.begin() as conn:
                yield conn
                commit.send(conn.sync_connection)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction (a consistent snapshot on both engines)."""
        async with self._read_engine.connect() as conn:
            yield conn  # closing the connection rolls the snapshot back

    async def run_write(self, work: Callable[[Connection], T]) -> T:
        """Run the synchronous ``work`` in one write transaction and return what it returns.

        For the hot batch paths. On PostgreSQL ``work`` runs through SQLAlchemy's greenlet bridge
        on this loop. On SQLite it runs directly on a plain sqlite3 connection, on this thread: a
        batch is a few statements against a local file, and running them here costs far less than
        handing each one to a driver thread and waiting for the GIL to come back under load.
        Worker processes take turns through a file lock beside the database (the kernel hands it
        over the moment it is released, where SQLite's busy handler sleeps in coarse steps); other
        writers are waited for with ``asyncio.sleep``. Neither ever blocks the event loop.
        """
        if not self.is_sqlite:
            async with self.write() as conn:
                return await conn.run_sync(work)
        async with self._write_lock, self._writer_turn():
            direct = self._direct_connection()
            transaction = direct.begin()  # bookkeeping only: the driver's BEGIN is ours, below
            try:
                await self._begin_immediate(direct)
                result = work(direct)
                # COMMIT waits for fsync (synchronous=FULL) on this thread. Measured: handing it to
                # a thread cost more in resuming the batch late than the blocked loop did; and with
                # two worker processes one commits while the other serves HTTP.
                with _commit_outcome() as commit:
                    commit.send(direct)
                    transaction.commit()
            except BaseException:
                if transaction.is_active:
                    transaction.rollback()
                raise
            return result

    def writer(self) -> Writer:
        """A write connection kept for one batch loop (see :class:`Writer`)."""
        return Writer(self)

    async def run_read(self, work: Callable[[Connection], T]) -> T:
        """Run the synchronous ``work`` in a read snapshot: for short lookups on hot paths.

        On SQLite it runs on this thread against a plain sqlite3 connection (a primary-key lookup
        takes microseconds, less than a hop to a driver thread); WAL readers never wait for writers.
        Long scans belong in :meth:`read`, which never blocks the event loop.
        """
        if not self.is_sqlite:
            async with self.read() as conn:
                return await conn.run_sync(work)
        if self._reader is None or self._reader.closed:
            self._reader = self._open_direct()
        with self._reader.begin():  # commits (or rolls back) the BEGIN below
            # The direct connection is in autocommit mode: without this, each statement of
            # ``work`` would see its own snapshot.
            driver: Any = self._reader.connection.driver_connection
            driver.execute("BEGIN")
            return work(self._reader)

    @asynccontextmanager
    async def _writer_turn(self) -> AsyncIterator[None]:
        """Hold the cross-process writer lock file for the length of one write transaction."""
        fd = self._writer_lock_fd()
        if fd is None:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting = asyncio.ensure_future(asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX))
            try:
                await asyncio.shield(waiting)
            except asyncio.CancelledError:  # the lock still arrives; give it straight back
                waiting.add_done_callback(lambda _: fcntl.flock(fd, fcntl.LOCK_UN))
                raise
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _writer_lock_fd(self) -> int | None:
        if self._lock_fd is None:
            database = self.engine.url.database
            if not database or database == ":memory:" or database.startswith("file:"):
                return None
            self._lock_fd = os.open(f"{database}-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
        return self._lock_fd

    def _direct_connection(self) -> Connection:
        if self._direct is None or self._direct.closed:
            self._direct = self._open_direct()
        return self._direct

    def _open_direct(self) -> Connection:
        url = self.engine.url.set(drivername="sqlite+pysqlite")
        # One task at a time uses it (the write lock); any thread may close it at shutdown.
        engine = sa_create_engine(
            url,
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
            hide_parameters=True,
        )
        _apply_sqlite_rules(engine, self._settings, direct=True)
        return engine.connect()

    async def _begin_immediate(self, conn: Connection) -> None:
        deadline = time.monotonic() + self._settings.sqlite_busy_timeout_ms / 1000
        pause = 0.0002
        while True:
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                return
            except OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(pause)  # another process holds the write lock
                pause = min(pause * 2, 0.005)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        for direct in (self._direct, self._reader):
            if direct is not None:
                direct.close()
                direct.engine.dispose()
        self._direct = self._reader = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        await self.engine.dispose()


class Writer:
    """Runs one batch loop's write transactions, keeping its connection between them.

    On PostgreSQL a batch through the pool pays a checkout and a pre-ping round trip, and under
    load every round trip waits behind a turn of the event loop's HTTP work. So a writer keeps one
    connection: it is replaced when SQLAlchemy invalidates it (a disconnect fails that one batch
    and the next reconnects) and, after ``IDLE_RECHECK_SECONDS`` unused, handed back for a fresh
    pre-pinged one. On SQLite it is :meth:`Database.run_write`, already on a kept connection.
    """

    IDLE_RECHECK_SECONDS = 30.0

    def __init__(self, database: Database) -> None:
        self._database = database
        self._conn: AsyncConnection | None = None
        self._last_used = 0.0

    async def run(self, work: Callable[[Connection], T]) -> T:
        """Run the synchronous ``work`` in one write transaction and return what it returns."""
        if self._database.is_sqlite:
            return await self._database.run_write(work)
        conn = await self._connection()
        try:
            with _commit_outcome() as commit:
                async with conn.begin():
                    result = await conn.run_sync(work)
                    commit.send(conn.sync_connection)
        except BaseException:
            if conn.invalidated or conn.closed or _driver_closed(conn.sync_connection):
                await self.close()  # raw driver errors leave SQLAlchemy unaware: check the socket
            raise
        self._last_used = time.monotonic()
        return result

    async def _connection(self) -> AsyncConnection:
        if self._conn is not None and (
            time.monotonic() - self._last_used > self.IDLE_RECHECK_SECONDS
        ):
            await self.close()
        if self._conn is None:
            self._conn = await self._database.engine.connect()
        return self._conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


class _Commit:
    """Marks the moment a transaction's COMMIT is about to be sent (see :func:`_commit_outcome`)."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False

    def send(self, conn: Connection | None) -> None:
        """Call just before COMMIT: raises if the connection is already known to be lost.

        A connection lost before COMMIT went out means the server rolled the transaction back, so
        the client may safely retry; only past this point is a failure an unknown outcome.
        """
        if _driver_closed(conn):
            raise DatabaseUnavailable(
                "The database connection was lost before commit; nothing was written; retry.",
                headers={"Retry-After": "1"},
            )
        self.sent = True


def _driver_closed(conn: Connection | None) -> bool:
    """True when the driver knows its socket is gone (asyncpg; SQLite has none to lose)."""
    if conn is None or conn.closed or conn.invalidated:
        return False
    is_closed = getattr(conn.connection.driver_connection, "is_closed", None)
    return bool(is_closed is not None and is_closed())


@contextmanager
def _commit_outcome() -> Iterator[_Commit]:
    """Turn an error raised once COMMIT was sent into what it means for the client."""
    commit = _Commit()
    try:
        yield commit
    except Exception as exc:
        if not commit.sent:
            raise
        failure = commit_failure(exc)
        if failure is exc:
            raise
        raise failure from exc
