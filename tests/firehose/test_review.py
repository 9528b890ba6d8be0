"""A hostile review's findings on the firehose, each as a test that fails on the code it reviewed.

Each test states the behaviour the firehose promises (a 202 is durable and stored once, bad input
gets a 4xx, reads never 5xx on what ingest accepted, replay stores nothing twice) and feeds it the
input or the sequence that breaks it. None of them is marked xfail: they are meant to fail until
the fix lands.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from keel.cli import app as cli
from keel.core.database import Database, create_engine
from keel.core.schemas import decode_cursor
from keel.firehose import Client
from keel.firehose._client_core import Backoff
from keel.firehose.events import EventRow, decode_batch, now_us
from keel.firehose.service import EventQuery, list_events
from keel.firehose.store import _PG_INSERT, dead_letter, insert_rows
from keel.firehose.tables import dead_letters, events
from tests import backends
from tests.conftest import ALL_CHAINS
from tests.firehose.test_ingest import event, stored

NDJSON = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"}


@pytest.fixture
async def lenient(firehose_app: Any, make_key: Any) -> Any:
    """An admin client that sees a 500 as a 500 (not as the app's exception, as httpx's would)."""
    key = await make_key()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=firehose_app, raise_app_exceptions=False),
        base_url="http://firehose.test",
        headers={"Authorization": f"Bearer {key}"},
    ) as client:
        yield client


def line() -> tuple[str, bytes]:
    event_id = str(uuid.uuid4())
    return event_id, json.dumps(event(event_id=event_id)).encode() + b"\n"


# --- A 202, then lost ---------------------------------------------------------------------------


async def test_gzip_members_after_the_first_are_not_dropped_silently(
    firehose: httpx.AsyncClient, database: Database, drained: Any
) -> None:
    """RFC 1952: a gzip body is a series of members (pigz, streamed writers, cat a.gz b.gz).

    inflate() stops at the end of the first member and ignores ``unused_data``: the second
    member's events get a 202 and are never stored.
    """
    first, second = line(), line()
    body = gzip.compress(first[1]) + gzip.compress(second[1])
    reply = await firehose.post("/events/batch", content=body, headers=NDJSON)
    if reply.status_code == 202:  # accepting it is fine, if every acknowledged event is stored
        assert reply.json()["accepted"] == 2, reply.text
        await drained()
        assert await stored(database, first[0], second[0]) == {first[0]: 1, second[0]: 1}
    else:
        assert reply.status_code == 400, reply.text


async def test_gzip_with_trailing_garbage_is_refused(firehose: httpx.AsyncClient) -> None:
    """Bytes after the gzip trailer are a corrupt or truncated upload, not something to ignore."""
    _, body = line()
    reply = await firehose.post(
        "/events/batch", content=gzip.compress(body) + b"\x00garbage", headers=NDJSON
    )
    assert reply.status_code == 400, reply.text


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_an_integer_user_id_past_int64_is_refused_not_acknowledged(
    firehose: httpx.AsyncClient, database: Database
) -> None:
    """The schema says int64; msgspec decodes any int up to 4,300 digits, so a 300-digit user id
    gets a 202, then PostgreSQL's varchar(255) refuses it (22001): a dead letter no replay can
    ever store. (On SQLite it is stored with a user_id GET /events cannot even ask for.)"""
    event_id = str(uuid.uuid4())
    body = b'{"event_id":"%s","user_id":%s,"timestamp":%d}' % (
        event_id.encode(),
        b"9" * 300,
        int(time.time()),
    )
    reply = await firehose.post(
        "/events", content=body, headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 422, (reply.status_code, await stored(database, event_id))


async def test_the_nil_uuid_is_not_taken_as_an_event_id(
    firehose: httpx.AsyncClient, database: Database
) -> None:
    """A client whose id field is uninitialised sends 00000000-…: every event after the first
    gets a 202 "accepted" and is deduplicated away, silently."""
    nil = "00000000-0000-0000-0000-000000000000"
    replies = [
        await firehose.post("/events", json=event(f"nil-{n}", event_id=nil)) for n in range(2)
    ]
    assert [r.status_code for r in replies] != [202, 202], await stored(database, nil)


# --- Stored twice -------------------------------------------------------------------------------

NUL_EVENT = b'{"user_id":"dl","timestamp":%d,"event_id":"%s","metadata":{"k":"a\\u0000b"}}'


async def dead_letters_of(database: Database, event_id: str) -> int:
    async with database.read() as conn:
        found = await conn.execute(
            select(func.count())
            .select_from(dead_letters)
            .where(dead_letters.c.event_id == uuid.UUID(event_id))
        )
        return int(found.scalar_one())


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_retried_batch_leaves_one_dead_letter_per_refused_event(
    firehose: httpx.AsyncClient, database: Database
) -> None:
    """Clients re-send a batch after a 502/timeout (the Python client does, by design). Events
    dedupe; dead letters do not (no unique event_id), so each re-send adds one more."""
    refused = str(uuid.uuid4())
    batch = b"[%s]" % (NUL_EVENT % (int(time.time()), refused.encode()))
    for _ in range(2):
        reply = await firehose.post(
            "/events/batch", content=batch, headers={"Content-Type": "application/json"}
        )
        assert reply.status_code == 202, reply.text
    assert await dead_letters_of(database, refused) == 1


@pytest.fixture
def private_postgres(backend: str) -> Iterator[str]:
    """A PostgreSQL database of its own: the CLI replays every dead letter it finds."""
    yield from backends.migrated_postgres_database(ALL_CHAINS)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_cli_replay_tries_a_refused_dead_letter_once(private_postgres: str) -> None:
    """cli._replay says "those refused again come back with new ids: not replayed twice", but
    it pages with ``id > last`` and the new ids are larger: it replays the same refused event
    again and again until --limit, and reports that many replays."""
    row = EventRow(uuid.uuid4(), "dl", None, now_us(), now_us(), None, now_us(), '{"k":"\\u0000"}')

    async def seed() -> None:
        database = Database(create_engine(private_postgres))
        await dead_letter(database, row, "22P05: seeded")
        await database.dispose()

    asyncio.run(seed())
    replayed = CliRunner().invoke(
        cli,
        ["firehose", "dead-letters", "replay", "--database-url", private_postgres, "--limit", "25"],
    )
    assert replayed.exit_code == 0, replayed.output
    assert "1 dead letter(s) replayed" in replayed.output, replayed.output


# --- Accepted, then a 5xx on every read ---------------------------------------------------------


async def test_metadata_ingest_accepts_can_be_read_back(
    lenient: httpx.AsyncClient, drained: Any
) -> None:
    """A 5,000-digit integer is valid JSON and passes the 32 KiB check; json.loads refuses it
    (int_max_str_digits) in _stored, so every page of GET /events holding it is a 500."""
    user = f"big-{uuid.uuid4()}"
    body = b'{"user_id":"%s","timestamp":%d,"metadata":{"n":%s}}' % (
        user.encode(),
        int(time.time()),
        b"9" * 5_000,
    )
    reply = await lenient.post(
        "/events", content=body, headers={"Content-Type": "application/json"}
    )
    if reply.status_code == 202:
        await drained()
        page = await lenient.get("/events", params={"user_id": user})
        assert page.status_code == 200, page.text
        assert page.json()["items"][0]["metadata"] == {"n": int("9" * 5_000)}
        page = await lenient.get("/events")  # everyone's newest page, too
        assert page.status_code == 200, page.text
    else:
        assert reply.status_code in (400, 413, 422), reply.text


# --- DoS: memory and slow reads -----------------------------------------------------------------


def test_a_refused_oversized_batch_costs_little_memory() -> None:
    """1 MiB of two-byte NDJSON lines gzips to ~1 KiB. decode_batch split all 350k lines before
    counting against the 1,000-event limit: 18 MB per request, 20,000x the bytes sent.

    (A JSON array still decodes its items before counting them: at most 32 MB for 1 MiB of
    ``[0,0,…]``, freed before the call returns. Decoding is synchronous, so that is a peak per
    process, never one per concurrent request; nothing cheap tells an array's length first.)"""
    for body, ndjson in ((b"00\n" * 349_000, True),):
        tracemalloc.start()
        try:
            with pytest.raises(Exception, match="at most 1000 events"):
                decode_batch(body, ndjson=ndjson, received_us=now_us())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2 * len(body), f"{peak / 1e6:.1f} MB to refuse {len(body) / 1e6:.1f} MB"


async def plan_of(database: Database, query: EventQuery) -> str:
    """The query plan of the statement list_events really runs (caught on the engine)."""
    caught: list[tuple[str, Any]] = []

    def catch(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if "firehose_events" in statement and not statement.startswith("EXPLAIN"):
            caught.append((statement, params))

    sa_event.listen(database.engine.sync_engine, "before_cursor_execute", catch)
    try:
        async with database.read() as conn:
            await list_events(conn, query)
            statement, params = caught[-1]
            if database.is_sqlite:
                rows = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
            else:  # what the planner can do at all, whatever the table's size today
                await conn.execute(text("SET LOCAL enable_seqscan = off"))
                await conn.execute(text("SET LOCAL enable_sort = off"))
                rows = await conn.exec_driver_sql("EXPLAIN " + statement, params)
            return "\n".join(str(row[-1]) for row in rows)
    finally:
        sa_event.remove(database.engine.sync_engine, "before_cursor_execute", catch)


@pytest.mark.parametrize("by", ["user_id", "name"])
async def test_a_filtered_page_reads_one_window_of_the_primary_key(
    database: Database, by: str
) -> None:
    """GET /events?user_id=… (or ?name=…) has no index to serve it (one would cost ingest more
    than half its speed); a page must read a bounded range of seq, never the whole table."""
    await database.run_write(lambda conn: insert_rows(conn, [_row("u1", "click")]))
    query = EventQuery(
        user_id="u1" if by == "user_id" else None,
        name="click" if by == "name" else None,
        since_us=None,
        until_us=None,
        before_seq=None,
        limit=50,
    )
    plan = await plan_of(database, query)
    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan  # no sort of the matches
    if database.is_sqlite:
        assert "USING INTEGER PRIMARY KEY (rowid>?" in plan, plan
    else:
        assert "Index Cond: (seq >=" in plan, plan


def _row(user_id: str, name: str | None = None) -> EventRow:
    now = now_us()
    return EventRow(uuid.uuid4(), user_id, name, now, now, None, now, None)


@pytest.mark.parametrize("by", ["user_id", "name"])
async def test_following_cursors_of_a_filtered_listing_finds_every_match_once(
    database: Database, by: str
) -> None:
    """Pages of a bounded window may come back short or empty with a cursor; walking them all
    must still find every match, each once, newest first, and end with no cursor."""
    rare = f"rare-{uuid.uuid4()}"  # the database may hold other tests' events
    rows = [_row(f"crowd-{n}", "view") for n in range(1_000)]
    for position in (0, 1, 2, 99, 100, 101, 433, 434, 700, 998, 999):
        rows[position] = _row(rare, rare)
    await database.run_write(lambda conn: insert_rows(conn, rows))
    wanted = [str(r.event_id) for r in reversed(rows) if r.user_id == rare]
    async with database.read() as conn:
        stored = (await conn.execute(select(func.count()).select_from(events))).scalar_one()
    found: list[str] = []
    pages, empty, before = 0, 0, None
    while True:
        query = EventQuery(
            user_id=rare if by == "user_id" else None,
            name=rare if by == "name" else None,
            since_us=None,
            until_us=None,
            before_seq=before,
            limit=2,
            scan_rows=100,
        )
        async with database.read() as conn:
            page = await list_events(conn, query)
        pages += 1
        empty += not page.items
        found += [str(item.event_id) for item in page.items]
        if page.next_cursor is None:
            break
        before = decode_cursor(page.next_cursor)
    assert found == wanted
    assert empty > 0 and pages <= stored // 100 + 1 + len(wanted), (pages, empty)  # windows


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_one_refused_event_does_not_send_its_whole_group_row_by_row(
    database: Database,
) -> None:
    """insert_rows (the direct buffer's group commit) falls back to one INSERT and one savepoint
    per row as soon as any row is refused: one 202'd event with \\u0000 in its metadata makes
    its whole group (up to max_batch=512 requests x 1,000 events) go row by row, past the write
    timeout (502 for every neighbour, who then re-send it all). store_batch halves instead."""
    rows = [
        EventRow(uuid.uuid4(), "group", None, now_us(), now_us(), None, now_us(), None)
        for _ in range(1_000)
    ]
    rows.insert(500, rows[0]._replace(event_id=uuid.uuid4(), metadata='{"k":"\\u0000"}'))
    inserts = 0

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal inserts
        inserts += statement == _PG_INSERT

    sa_event.listen(database.engine.sync_engine, "before_cursor_execute", count)
    try:
        async with database.write() as conn:
            await conn.run_sync(lambda sync: insert_rows(sync, rows))
    finally:
        sa_event.remove(database.engine.sync_engine, "before_cursor_execute", count)
    assert await stored(database, str(rows[0].event_id)) == {str(rows[0].event_id): 1}
    assert inserts <= 2 * 11 * 2, f"{inserts} INSERTs for 1,001 rows and one refusal"


# --- The Python client --------------------------------------------------------------------------


def test_retry_after_keeps_the_jitter() -> None:
    """Backoff.delay returns max(jitter, Retry-After): every client refused by the same 503
    (Retry-After: 1) retries at exactly +1.000 s, the synchronised wave the jitter is for."""
    delays = {Backoff().delay(attempt, retry_after=1.0) for attempt in range(3) for _ in range(50)}
    assert len(delays) > 1, delays


def test_flush_returns_once_what_was_queued_is_sent() -> None:
    """flush() says "send everything queued now", but waits for an empty queue: while other
    threads keep capturing, it never returns (or returns False at its timeout)."""
    stop = threading.Event()
    holder: dict[str, Client] = {}

    def collector(request: httpx.Request) -> httpx.Response:
        if not stop.is_set():  # another thread of the app keeps capturing meanwhile
            holder["client"].capture("busy", "tick")
        count = len(json.loads(gzip.decompress(request.content)))
        return httpx.Response(202, json={"accepted": count, "rejected": []})

    firehose = Client(
        "http://collector.test",
        "key",
        flush_interval=60.0,
        transport=httpx.MockTransport(collector),
    )
    holder["client"] = firehose
    try:
        for n in range(10):
            firehose.capture("u", f"e{n}")
        assert firehose.flush(timeout=5.0), firehose.stats
    finally:
        stop.set()
        firehose.close(timeout=5.0)
