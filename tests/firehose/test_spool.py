"""The spool buffer on a real SQLite file, drained into a real PostgreSQL store.

Exactly once: what is appended reaches the store once, and a drainer killed between the store's
commit and the spool's delete (a real SIGKILL) has its events delivered again and still stored
once. The bound, and a spool that cannot write, refuse out loud and keep nothing partial.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from keel.core.database import Database, create_engine
from keel.firehose import errors
from keel.firehose.buffers.spool import SpoolBuffer
from keel.firehose.settings import FirehoseSettings
from tests.firehose.load import rows, store_counts, until
from tests.support.live_server import free_port

# The spool exists to feed a PostgreSQL store.
postgres_store = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


def spool_settings(store_url: str, spool: Path, **overrides: Any) -> FirehoseSettings:
    return FirehoseSettings(database_url=store_url, spool_path=spool, **overrides)


@pytest.fixture
async def spooled(
    database: Database, database_url: str, tmp_path: Path
) -> AsyncIterator[SpoolBuffer]:
    buffer = SpoolBuffer(
        database, spool_settings(database_url, tmp_path / "spool.db", flush_size=50, flush_age_ms=5)
    )
    await buffer.start()
    yield buffer
    await buffer.stop()


async def drained(buffer: SpoolBuffer) -> None:
    async def empty() -> bool:
        return (await buffer.health()).depth == 0

    await until(empty, 30, "the spool to drain")


@postgres_store
async def test_appended_events_reach_the_store_once(
    spooled: SpoolBuffer, database: Database
) -> None:
    # Concurrent requests of various sizes: group commits of several, rows split at flush_size.
    requests = [rows(n) for n in (1, 7, 30, 120, 1, 49, 50, 51, 3, 200)]
    await asyncio.gather(*(spooled.append(r) for r in requests))
    await drained(spooled)
    ids = [row.event_id for r in requests for row in r]
    assert set((await store_counts(database, ids)).values()) == {1}
    health = await spooled.health()
    assert health.store.status == "ok" and health.oldest_age_seconds is None


CRASH_AFTER_STORE = """
import asyncio, os, signal, sys, uuid
from keel.core.database import Database, create_engine
from keel.firehose.buffers.spool import SpoolBuffer
from keel.firehose.events import EventRow, now_us
from keel.firehose.settings import FirehoseSettings

async def main(store_url, spool_path, ids):
    # Nothing flushes on its own: the test's steps are the only drain.
    settings = FirehoseSettings(
        database_url=store_url, spool_path=spool_path, flush_age_ms=3_600_000, flush_size=100_000
    )
    buffer = SpoolBuffer(Database(create_engine(store_url)), settings)
    await buffer.start()
    t = now_us()
    await buffer.append([EventRow(uuid.UUID(i), "crash", None, t, t, None, t, None) for i in ids])
    batch = await buffer.take()
    await buffer.store(batch)
    os.kill(os.getpid(), signal.SIGKILL)  # stored, not yet forgotten: a crash right there

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
"""


def spooled_events(spool: Path) -> int:
    with sqlite3.connect(spool) as db:
        (depth,) = db.execute("SELECT events FROM spool_depth").fetchone()
        (in_rows,) = db.execute("SELECT COALESCE(SUM(events), 0) FROM spool").fetchone()
    assert depth == in_rows  # the running total agrees with the rows
    return int(depth)


@postgres_store
async def test_a_drainer_killed_between_store_and_delete_delivers_again_once(
    database: Database, database_url: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.db"
    ids = [row.event_id for row in rows(40)]
    crashed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", CRASH_AFTER_STORE, database_url, str(spool), *map(str, ids)],
        capture_output=True,
        timeout=120,
    )
    assert crashed.returncode == -9, crashed.stderr.decode()[-2000:]
    assert set((await store_counts(database, ids)).values()) == {1}  # the store committed
    assert spooled_events(spool) == 40  # and the spool still holds them all

    restarted = SpoolBuffer(database, spool_settings(database_url, spool, flush_age_ms=5))
    await restarted.start()
    try:
        await drained(restarted)
        assert restarted.status.last_flush is not None  # delivered again, not just forgotten
    finally:
        await restarted.stop()
    assert set((await store_counts(database, ids)).values()) == {1}
    assert spooled_events(spool) == 0


@postgres_store
async def test_one_process_drains_and_takes_the_others_appends(
    spooled: SpoolBuffer, database: Database, database_url: str, tmp_path: Path
) -> None:
    other = SpoolBuffer(
        database, spool_settings(database_url, tmp_path / "spool.db", flush_age_ms=5)
    )
    await other.start()
    try:
        appended = rows(25)
        await other.append(appended)
        assert (await spooled.health()).extra["draining_here"] is True
        assert (await other.health()).extra["draining_here"] is False  # the lock is taken
        await drained(other)
        counts = await store_counts(database, [row.event_id for row in appended])
        assert set(counts.values()) == {1}
    finally:
        await other.stop()


async def test_past_the_bound_a_request_is_refused_whole_and_the_rest_still_fit(
    tmp_path: Path,
) -> None:
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"  # the store is down
    store = Database(create_engine(unreachable))
    buffer = SpoolBuffer(
        store, spool_settings(unreachable, tmp_path / "spool.db", buffer_max_events=10)
    )
    await buffer.start()
    try:
        await buffer.append(rows(4))
        # One group commit: 4 fits, 5 does not (refused whole), 2 still fits.
        outcomes = await asyncio.gather(
            buffer.append(rows(4)),
            buffer.append(rows(5)),
            buffer.append(rows(2)),
            return_exceptions=True,
        )
        assert outcomes[0] is None and outcomes[2] is None
        refused = outcomes[1]
        assert isinstance(refused, errors.BufferFull)
        assert refused.status == 503 and refused.headers == {"Retry-After": "1"}
        with pytest.raises(errors.BufferFull):
            await buffer.append(rows(1))
        health = await buffer.health()
        assert health.depth == 10 and health.max_events == 10
        await until(lambda: buffer.status.status == "down", 10, "the drain to see the store down")
    finally:
        await buffer.stop()
        await store.dispose()
    assert spooled_events(tmp_path / "spool.db") == 10  # kept for the next start


@postgres_store
async def test_a_spool_that_cannot_write_refuses_with_503(spooled: SpoolBuffer) -> None:
    # A full disk, as SQLite meets it: the file may not grow by a single page.
    # The plain sqlite3 connection every spool write runs on.
    writer = spooled.spool._direct_connection().connection.driver_connection
    (pages,) = writer.execute("PRAGMA page_count").fetchone()
    writer.execute(f"PRAGMA max_page_count = {pages}")
    big = rows(2_000, user="x" * 200)
    with pytest.raises(errors.BufferUnavailable) as refused:
        await spooled.append(big)
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    assert (await spooled.health()).depth == 0  # nothing partial
    writer.execute("PRAGMA max_page_count = 1073741823")
    await spooled.append(big)  # room again: accepted


@postgres_store
async def test_a_graceful_stop_drains_what_is_spooled(
    database: Database, database_url: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.db"
    # Nothing is due on its own (an hour's age, a size never reached): only stop() drains.
    buffer = SpoolBuffer(
        database, spool_settings(database_url, spool, flush_age_ms=3_600_000, flush_size=100_000)
    )
    await buffer.start()
    appended = rows(300)
    await buffer.append(appended)
    assert (await buffer.health()).depth == 300
    await buffer.stop()
    assert spooled_events(spool) == 0
    assert set((await store_counts(database, [r.event_id for r in appended])).values()) == {1}
