"""Reading stored events back, and the dead letters: the firehose's rules off the hot path."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from sqlalchemy import Text, cast, delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from keel.core.database import Database
from keel.core.schemas import Page, encode_cursor
from keel.firehose.buffers import Buffer
from keel.firehose.events import EARLIEST_US, LATEST_US, now_us
from keel.firehose.schemas import (
    DeadLetter,
    MinuteCount,
    NameCount,
    Stats,
    StoredEvent,
    rfc3339,
)
from keel.firehose.store import row_from_json
from keel.firehose.tables import dead_letters, events

# A page filtered by user or name reads at most this many of the newest events (by seq, the
# primary key): no index serves those filters (each would cost ingest more than it saves), so
# without a bound one query for a rare user would read the whole table. About 20 ms on SQLite.
SCAN_ROWS = 100_000


@dataclass(frozen=True)
class EventQuery:
    user_id: str | None
    name: str | None
    since_us: int | None
    until_us: int | None
    before_seq: int | None
    limit: int
    scan_rows: int = SCAN_ROWS


def epoch_us(moment: datetime | None) -> int | None:
    """A query's time bound in epoch µs (naive means UTC), within the years events may have."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    micros = (moment - _EPOCH) // timedelta(microseconds=1)
    return max(EARLIEST_US, min(micros, LATEST_US))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _event_id(value: Any) -> uuid.UUID:
    return uuid.UUID(bytes=value) if isinstance(value, bytes) else value


def _stored(row: Any) -> StoredEvent:
    metadata = row.metadata
    if isinstance(metadata, str):
        metadata = msgspec.json.decode(metadata)  # integers of any length, as ingest took them
    return StoredEvent(
        seq=row.seq,
        event_id=_event_id(row.event_id),
        user_id=row.user_id,
        name=row.name,
        timestamp=rfc3339(row.timestamp_us) or "",
        original_timestamp=rfc3339(row.original_timestamp_us) or "",
        sent_at=rfc3339(row.sent_at_us),
        received_at=rfc3339(row.received_at_us) or "",
        metadata=metadata,
    )


async def list_events(conn: AsyncConnection, query: EventQuery) -> Page[StoredEvent]:
    """Newest first (arrival order), filtered; one page past ``before_seq``.

    A filter on ``user_id`` or ``name`` looks through one window of ``scan_rows`` events below
    ``before_seq``: a page may then hold fewer than ``limit`` events, or none, and still have a
    ``next_cursor``, which continues below the window. Following cursors to the end finds every
    match exactly once; no page costs more than one window.
    """
    # metadata as its text: SQLAlchemy's JSONB reader (json.loads) refuses integers ingest took
    columns = [c for c in events.c if c.key != "metadata"]
    statement = select(*columns, cast(events.c.metadata, Text).label("metadata"))
    if query.user_id is not None:
        statement = statement.where(events.c.user_id == query.user_id)
    if query.name is not None:
        statement = statement.where(events.c.name == query.name)
    if query.since_us is not None:
        statement = statement.where(events.c.timestamp_us >= query.since_us)
    if query.until_us is not None:
        statement = statement.where(events.c.timestamp_us < query.until_us)
    if query.before_seq is not None:
        statement = statement.where(events.c.seq < query.before_seq)
    floor: int | None = None  # the window's lowest seq, when a filter bounds the scan
    lowest = 0
    if query.user_id is not None or query.name is not None:
        lowest, highest = (await conn.execute(_SEQ_RANGE)).one()
        if highest is None:
            return Page(items=[], next_cursor=None)
        top = highest + 1 if query.before_seq is None else min(query.before_seq, highest + 1)
        floor = max(top - query.scan_rows, lowest)
        statement = statement.where(events.c.seq >= floor)
    rows = (
        await conn.execute(statement.order_by(events.c.seq.desc()).limit(query.limit + 1))
    ).all()
    items = [_stored(row) for row in rows[: query.limit]]
    if len(rows) > query.limit:
        return Page(items=items, next_cursor=encode_cursor(items[-1].seq))
    if floor is not None and floor > lowest:
        return Page(items=items, next_cursor=encode_cursor(floor))  # below the window
    return Page(items=items, next_cursor=None)


# Two subqueries, not min() and max() in one: SQLite answers each from the primary key alone.
_SEQ_RANGE = select(
    select(func.min(events.c.seq)).scalar_subquery(),
    select(func.max(events.c.seq)).scalar_subquery(),
)


async def stats(conn: AsyncConnection, window_seconds: int) -> Stats:
    """Counts of events whose (corrected) timestamp falls in the last ``window_seconds``."""
    until = now_us()
    since = until - window_seconds * 1_000_000
    in_window = (events.c.timestamp_us >= since) & (events.c.timestamp_us < until)
    minute = (events.c.timestamp_us // 60_000_000).label("minute")
    per_minute = (
        await conn.execute(
            select(minute, func.count()).where(in_window).group_by(minute).order_by(minute)
        )
    ).all()
    per_name = (
        await conn.execute(
            select(events.c.name, func.count())
            .where(in_window)
            .group_by(events.c.name)
            .order_by(func.count().desc(), events.c.name)
            .limit(100)
        )
    ).all()
    return Stats(
        since=rfc3339(since) or "",
        until=rfc3339(until) or "",
        total=sum(count for _, count in per_minute),
        per_minute=[
            MinuteCount(minute=rfc3339(m * 60_000_000) or "", count=c) for m, c in per_minute
        ],
        per_name=[NameCount(name=n, count=c) for n, c in per_name],
    )


async def list_dead_letters(
    conn: AsyncConnection, after_id: int | None, limit: int
) -> Page[DeadLetter]:
    statement = select(dead_letters).order_by(dead_letters.c.id).limit(limit + 1)
    if after_id is not None:
        statement = statement.where(dead_letters.c.id > after_id)
    rows = (await conn.execute(statement)).all()
    items = [
        DeadLetter(
            id=row.id,
            event_id=_event_id(row.event_id),
            reason=row.reason,
            failed_at=rfc3339(row.failed_at_us) or "",
            event=json.loads(row.event),
        )
        for row in rows[:limit]
    ]
    more = len(rows) > limit
    return Page(items=items, next_cursor=encode_cursor(items[-1].id) if more else None)


async def count_dead_letters(conn: AsyncConnection, cap: int = 10_000) -> int:
    """How many dead letters there are, counting no further than ``cap`` (for /health)."""
    some = select(dead_letters.c.id).limit(cap).subquery()
    return int((await conn.execute(select(func.count()).select_from(some))).scalar_one())


async def last_dead_letter_id(conn: AsyncConnection) -> int | None:
    last = (await conn.execute(select(func.max(dead_letters.c.id)))).scalar_one()
    return None if last is None else int(last)


async def replay_dead_letters(
    database: Database,
    buffer: Buffer,
    *,
    ids: Sequence[int] | None,
    limit: int,
    after_id: int | None = None,
    up_to_id: int | None = None,
) -> tuple[int, int | None]:
    """Append dead letters to the buffer again, then remove them; returns (count, last id).

    In that order: a crash between the two leaves a dead letter whose event may also be stored;
    replaying it again stores nothing twice (events are deduplicated by id). A letter whose
    event was refused again meanwhile (its row updated with the new reason) is kept.
    """
    statement = select(
        dead_letters.c.id, dead_letters.c.event, dead_letters.c.failed_at_us
    ).order_by(dead_letters.c.id)
    statement = statement.where(dead_letters.c.id.in_(ids)) if ids else statement.limit(limit)
    if after_id is not None:
        statement = statement.where(dead_letters.c.id > after_id)
    if up_to_id is not None:
        statement = statement.where(dead_letters.c.id <= up_to_id)
    async with database.read() as conn:
        found = (await conn.execute(statement)).all()
    if not found:
        return 0, after_id
    await buffer.submit([row_from_json(row.event) for row in found])
    async with database.write() as conn:
        # Only letters unchanged since read: one refused again meanwhile (its failed_at_us
        # updated by the same event's new refusal) stays.
        seen = [(r.id, r.failed_at_us) for r in found]
        await conn.execute(
            delete(dead_letters).where(
                tuple_(dead_letters.c.id, dead_letters.c.failed_at_us).in_(seen)
            )
        )
    return len(found), found[-1].id
