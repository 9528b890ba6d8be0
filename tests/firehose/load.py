"""Events with known ids for the firehose's proofs, and how many times the store holds each."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable

from sqlalchemy import func, select

from keel.core.database import Database
from keel.core.uuid7 import uuid7
from keel.firehose.events import EventRow, now_us
from keel.firehose.tables import events


def rows(count: int, user: str = "spool") -> list[EventRow]:
    """``count`` events with fresh UUIDv7 ids, as ingest would have decoded them."""
    now = now_us()
    return [EventRow(uuid7(), user, "click", now, now, None, now, None) for _ in range(count)]


async def store_counts(database: Database, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, int]:
    """How many rows the store holds for each id (read from the database, never from replies)."""
    wanted = list(ids)
    counts: dict[uuid.UUID, int] = dict.fromkeys(wanted, 0)
    async with database.read() as conn:
        for start in range(0, len(wanted), 5_000):
            chunk = wanted[start : start + 5_000]
            values = [i.bytes for i in chunk] if database.is_sqlite else chunk
            found = await conn.execute(
                select(events.c.event_id, func.count())
                .where(events.c.event_id.in_(values))
                .group_by(events.c.event_id)
            )
            for event_id, count in found:
                key = uuid.UUID(bytes=event_id) if isinstance(event_id, bytes) else event_id
                counts[key] = count
    return counts


async def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` (sync or async) until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = condition()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)
