"""A spool file on the host: ingestion carries on through a store (PostgreSQL) outage.

The default when the store is PostgreSQL and there is no Redis. Each group commit (the events of
many concurrent requests) becomes rows of a local SQLite file written with ``synchronous=FULL``,
so a 202 survives a crash of keel and of the store, and is lost only with this host's disk.
A spool row holds up to ``flush_size`` events encoded with msgpack: one row per group commit
(split at ``flush_size``), not one per request, so a burst of single-event requests costs one
row, and a drain step reads whole rows and stays within ``flush_size``.

One process per host drains the file at a time (a ``flock`` beside it; the store dedupes, so two
drainers would cost only duplicate work). Its writer reads the oldest rows, stores them with
:func:`keel.firehose.store.store_batch`, and only then deletes them: a crash in between delivers
them again and the store keeps each event once. While the store is down the writer backs off and
the spool grows, up to ``buffer_max_events``; past that, ingest answers 503 ``buffer_full``.
The bound is checked inside each group commit's transaction, against a running total kept in the
same file, so every process on the host shares it exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
from sqlalchemy.engine import Connection

from keel.core.batching import GroupCommitter
from keel.core.database import Database, create_engine
from keel.core.errors import KeelError
from keel.firehose import errors
from keel.firehose.buffers.base import BUFFER_DEPTH, Buffer, BufferHealth, StoreStatus
from keel.firehose.events import EventRow, now_us
from keel.firehose.settings import FirehoseSettings
from keel.firehose.store import store_batch

log = logging.getLogger("keel.firehose.spool")

DURABILITY = (
    "a local spool file (SQLite, synchronous=FULL) on this host: a 202 survives a crash of keel"
    " and of the store; it is lost only with this host's disk"
)
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0  # seconds between tries while the store is down
LOCK_RETRY_SECONDS = 1.0  # how often a process that does not drain asks for the drain lock
STORE_TIMEOUT_SECONDS = 30.0  # a flush that hangs this long is abandoned; its rows stay spooled
FINAL_DRAIN_SECONDS = 5.0  # what stop() spends emptying the spool before leaving the rest

_SCHEMA = (
    # AUTOINCREMENT: a seq is never handed out twice, even after deletes, so "delete through
    # last_seq" can never remove a row spooled after that batch was read. Writes are serialized,
    # so seq order is commit order too.
    "CREATE TABLE IF NOT EXISTS spool ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " received_at_us INTEGER NOT NULL,"
    " events INTEGER NOT NULL,"
    " rows BLOB NOT NULL)",
    # The running total of spooled events: the bound is checked on every group commit.
    "CREATE TABLE IF NOT EXISTS spool_depth ("
    " id INTEGER PRIMARY KEY CHECK (id = 1), events INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO spool_depth (id, events) VALUES (1, 0)",
    # Rows that no longer decode (written by another version of keel): kept, never dropped.
    "CREATE TABLE IF NOT EXISTS spool_rejects ("
    " seq INTEGER PRIMARY KEY, events INTEGER NOT NULL, rows BLOB NOT NULL, reason TEXT NOT NULL)",
    # Which store the spooled events were accepted for.
    "CREATE TABLE IF NOT EXISTS spool_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_encode = msgspec.msgpack.Encoder(uuid_format="bytes").encode
_decode = msgspec.msgpack.Decoder(list[EventRow]).decode


@dataclass(frozen=True, slots=True)
class SpoolBatch:
    """The oldest spooled events, read for one flush: forgotten through ``last_seq`` once stored.

    ``rejected`` are rows among them that do not decode: set aside in ``spool_rejects`` when
    the batch is forgotten, so one bad row never stops the drain.
    """

    last_seq: int
    rows: list[EventRow]
    rejected: list[tuple[int, int, bytes, str]] = field(default_factory=list)


def _sqlite(conn: Connection) -> sqlite3.Connection:
    driver = conn.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)  # Database.run_write/run_read on SQLite
    return driver


def _create_schema(conn: Connection) -> None:
    for statement in _SCHEMA:
        _sqlite(conn).execute(statement)


def _measure(conn: Connection) -> tuple[int, int | None]:
    """Events spooled, and when the oldest of them was spooled (epoch µs)."""
    db = _sqlite(conn)
    (depth,) = db.execute("SELECT events FROM spool_depth WHERE id = 1").fetchone()
    oldest = db.execute("SELECT received_at_us FROM spool ORDER BY seq LIMIT 1").fetchone()
    return int(depth), None if oldest is None else int(oldest[0])


def _read_oldest(conn: Connection, flush_size: int) -> SpoolBatch | None:
    """The oldest whole rows holding at most ``flush_size`` events (at least one row)."""
    cursor = _sqlite(conn).execute("SELECT seq, events, rows FROM spool ORDER BY seq")
    rows: list[EventRow] = []
    rejected: list[tuple[int, int, bytes, str]] = []
    last_seq = None
    try:
        while (found := cursor.fetchone()) is not None:
            seq, count, blob = found
            if rows and len(rows) + count > flush_size:
                break
            try:
                rows.extend(_decode(blob))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                rejected.append((seq, count, blob, f"{type(exc).__name__}: {exc}"))
            last_seq = seq
    finally:
        cursor.close()
    return None if last_seq is None else SpoolBatch(last_seq, rows, rejected)


def _set_aside(conn: Connection, rejected: list[tuple[int, int, bytes, str]]) -> None:
    _sqlite(conn).executemany(
        "INSERT OR IGNORE INTO spool_rejects (seq, events, rows, reason) VALUES (?, ?, ?, ?)",
        rejected,
    )


def _adopt(conn: Connection, store: str) -> None:
    """Claim the spool for ``store``; refuse one that holds events accepted for another store."""
    db = _sqlite(conn)
    found = db.execute("SELECT value FROM spool_meta WHERE key = 'store'").fetchone()
    (depth,) = db.execute("SELECT events FROM spool_depth WHERE id = 1").fetchone()
    if found is not None and found[0] != store and depth:
        raise RuntimeError(
            f"the spool holds {depth} events accepted for {found[0]}, not {store}: start keel"
            " against that store to drain it, or give this one its own KEEL_FIREHOSE_SPOOL_PATH"
        )
    db.execute("INSERT OR REPLACE INTO spool_meta (key, value) VALUES ('store', ?)", (store,))


def _forget_through(conn: Connection, last_seq: int) -> int:
    """Delete rows up to ``last_seq`` (stored already); returns how many events they held.

    Counted inside the delete's transaction, so a second drainer deleting the same rows (the
    lock makes that rare, never wrong) subtracts nothing twice.
    """
    db = _sqlite(conn)
    (count,) = db.execute(
        "SELECT COALESCE(SUM(events), 0) FROM spool WHERE seq <= ?", (last_seq,)
    ).fetchone()
    db.execute("DELETE FROM spool WHERE seq <= ?", (last_seq,))
    db.execute("UPDATE spool_depth SET events = events - ? WHERE id = 1", (count,))
    return int(count)


class SpoolBuffer(Buffer):
    kind = "spool"

    def __init__(self, store: Database, settings: FirehoseSettings) -> None:
        self._store = store
        self._settings = settings
        self._path = settings.spool_path
        spool_settings = settings.model_copy(
            update={"database_url": f"sqlite:///{self._path}", "sqlite_synchronous": "FULL"}
        )
        self.spool = Database(
            create_engine(spool_settings.database_url, spool_settings), spool_settings
        )
        self._committer: GroupCommitter[Sequence[EventRow], None] = GroupCommitter(
            name="firehose-spool",
            database=self.spool,
            apply=self._spool_requests,
            max_batch=settings.max_batch,
            weigh=len,
            max_weight=settings.max_batch_events,
        )
        self.status = StoreStatus()
        self._appended = asyncio.Event()
        self._stopping = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._draining = False  # this process holds the drain lock
        self._drain_error: str | None = None  # why this process cannot drain, while it cannot

    # -- ingest -------------------------------------------------------------------------------

    async def start(self) -> None:
        _owner_only(self._path)
        await self.spool.run_write(_create_schema)
        store = self._store.engine.url.render_as_string(hide_password=True)
        await self.spool.run_write(lambda conn: _adopt(conn, store))
        self._committer.start()
        self._drainer = asyncio.create_task(self._drain_forever(), name="keel-firehose-spool")

    async def append(self, rows: Sequence[EventRow]) -> None:
        try:
            await self._committer.submit(rows)
        except KeelError:
            raise
        except Exception as exc:  # disk full, I/O error: the spool cannot keep them
            log.error("spool %s cannot take events: %r", self._path, exc)
            raise errors.BufferUnavailable(
                f"The spool file cannot take events ({type(exc).__name__}); nothing was"
                " accepted; retry.",
                headers={"Retry-After": "1"},
            ) from exc
        self._appended.set()

    def _spool_requests(
        self, conn: Connection, requests: list[Sequence[EventRow]]
    ) -> list[BaseException | None]:
        """One group commit: the requests that fit under the bound are spooled, the rest refused."""
        db = _sqlite(conn)
        (depth,) = db.execute("SELECT events FROM spool_depth WHERE id = 1").fetchone()
        bound = self._settings.buffer_max_events
        room = bound - depth
        outcomes: list[BaseException | None] = []
        accepted: list[EventRow] = []
        for rows in requests:
            if len(rows) > room:
                outcomes.append(
                    errors.BufferFull(
                        f"The buffer holds its bound of {bound} events while the store catches"
                        " up; nothing was accepted; retry.",
                        headers={"Retry-After": "1"},
                    )
                )
                continue
            room -= len(rows)
            accepted.extend(rows)
            outcomes.append(None)
        if accepted:
            spooled_at, size = now_us(), self._settings.flush_size
            chunks = [accepted[i : i + size] for i in range(0, len(accepted), size)]
            db.executemany(
                "INSERT INTO spool (received_at_us, events, rows) VALUES (?, ?, ?)",
                [(spooled_at, len(chunk), _encode(chunk)) for chunk in chunks],
            )
            db.execute("UPDATE spool_depth SET events = events + ? WHERE id = 1", (len(accepted),))
        return outcomes

    # -- drain: the steps, in the order a flush takes them -------------------------------------

    async def take(self) -> SpoolBatch | None:
        """The oldest spooled events, up to ``flush_size`` (nothing is removed yet)."""
        size = self._settings.flush_size
        return await self.spool.run_read(lambda conn: _read_oldest(conn, size))

    async def store(self, batch: SpoolBatch) -> None:
        """Write ``batch`` into the store (deduplicated: a second delivery stores nothing new)."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(STORE_TIMEOUT_SECONDS):
                refused = await store_batch(self._store, batch.rows)
        except Exception as exc:
            if self.status.status == "ok":
                log.warning("store unavailable, events stay spooled: %r", exc)
            self.status.failed(exc)
            raise
        if self.status.status != "ok":
            log.info("store back: draining the spool")
        self.status.flushed(len(batch.rows), time.monotonic() - started, refused)

    async def forget(self, batch: SpoolBatch) -> int:
        """Delete ``batch`` from the spool: only once :meth:`store` has returned.

        Rows of it that did not decode move to ``spool_rejects`` in the same transaction.
        """

        def forget(conn: Connection) -> int:
            if batch.rejected:
                _set_aside(conn, batch.rejected)
            return _forget_through(conn, batch.last_seq)

        if batch.rejected:
            log.error(
                "spool %s: %d row(s) do not decode (%s); kept in its spool_rejects table",
                self._path,
                len(batch.rejected),
                batch.rejected[0][3][:200],
            )
        return await self.spool.run_write(forget)

    async def flush_once(self) -> int:
        """Take, store, forget: one flush; returns the events moved (0 if the spool is empty)."""
        batch = await self.take()
        if batch is None:
            return 0
        if batch.rows:
            await self.store(batch)
        await self.forget(batch)
        return len(batch.rows)

    # -- drain: the writer task -----------------------------------------------------------------

    async def _drain_forever(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._stopping.is_set():
            try:
                if not self._take_drain_lock():
                    await self._pause(LOCK_RETRY_SECONDS)
                    continue
            except OSError as exc:  # the lock file cannot be opened: nobody here can drain
                self._drain_error = f"cannot take the drain lock: {exc!r}"
                log.error("spool %s: %s", self._path, self._drain_error)
                await self._pause(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self._drain_error = None
            self._appended.clear()
            try:
                due_in = await self._flush_due_in()
                if due_in > 0:
                    await self._pause(due_in, self._appended)
                    continue
                await self.flush_once()
                backoff = BACKOFF_FIRST
            except Exception as exc:  # the store (logged by store()) or the spool file failed
                if self.status.status == "ok":
                    log.error("spool %s: flush failed: %r", self._path, exc)
                await self._pause(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _flush_due_in(self) -> float:
        """Seconds until a flush is due: now at ``flush_size`` events or ``flush_age_ms`` old.

        An empty spool is looked at again after ``flush_age_ms``: appends of other processes
        on this host do not wake this one.
        """
        depth, oldest_us = await self.spool.run_read(_measure)
        BUFFER_DEPTH.labels(self.kind).set(depth)  # /metrics follows the drain, not /health
        age_limit = self._settings.flush_age_ms / 1000
        if oldest_us is None:
            return age_limit
        if depth >= self._settings.flush_size:
            return 0.0
        return max(0.0, oldest_us / 1e6 + age_limit - time.time())

    async def _pause(self, seconds: float, *wake: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(e.wait()) for e in (self._stopping, *wake)]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _take_drain_lock(self) -> bool:
        """Try, without waiting, to become this host's drainer (released when the process ends)."""
        if self._draining:
            return True
        if self._lock_fd is None:
            self._lock_fd = os.open(f"{self._path}.drain.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._draining = True
        return True

    async def stop(self) -> None:
        """Refuse appends, spool what was queued, drain for a few seconds; the rest stays."""
        await self._committer.stop()
        self._stopping.set()
        try:
            async with asyncio.timeout(FINAL_DRAIN_SECONDS):
                if self._drainer is not None:
                    await asyncio.wait([self._drainer])
                if self._take_drain_lock():
                    while await self.flush_once():
                        pass
        except Exception as exc:  # the store is down or slow: the spool keeps the rest
            log.warning("stopping with events left in the spool: %r", exc)
        finally:
            if self._drainer is not None:
                self._drainer.cancel()
                await asyncio.wait([self._drainer])
            self._release_drain_lock()
            await self.spool.dispose()

    def _release_drain_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
        self._lock_fd, self._draining = None, False

    async def health(self) -> BufferHealth:
        depth, oldest_us = await self.spool.run_read(_measure)
        rejects = await self.spool.run_read(
            lambda conn: _sqlite(conn).execute("SELECT count(*) FROM spool_rejects").fetchone()[0]
        )
        age = None if oldest_us is None else round(max(0.0, time.time() - oldest_us / 1e6), 3)
        return BufferHealth(
            kind=self.kind,
            depth=depth,
            oldest_age_seconds=age,
            max_events=self._settings.buffer_max_events,
            durability=DURABILITY,
            store=self.status,
            extra={
                "path": str(self._path),
                "draining_here": self._draining,
                "drain_error": self._drain_error,
                "rejected_rows": rejects,  # rows that did not decode, kept in spool_rejects
                "requests_waiting": self._committer.queue_depth,
            },
        )

    def unready(self) -> str | None:
        if self._drain_error is not None:
            return f"spool {self._path}: {self._drain_error}"
        if self._drainer is not None and self._drainer.done() and not self._stopping.is_set():
            return f"spool {self._path}: the drain task stopped"
        return self._committer.unready()


def _owner_only(path: os.PathLike[str] | str) -> None:
    """The spool holds every event's data: readable by its owner only (SQLite gives its WAL and
    shared-memory files the database file's mode)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
