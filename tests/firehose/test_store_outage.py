"""The store (a PostgreSQL of the test's own) goes away under ingest, and the spool carries on.

- Bound: with a small ``buffer_max_events`` and the store stopped, ingest answers 202 until the
  spool is full, then 503 ``buffer_full`` with ``Retry-After``; a refused request leaves nothing.
- Outage: a two-worker firehose keeps answering 202 while the store is down for 30 s, ``/health``
  shows the store down and the spool growing, and once the store is back the spool drains by
  itself, with every acknowledged id stored exactly once.
- Crash: ``kill -9`` of every process of the firehose under load; after a restart the spool
  drains and every acknowledged id is stored exactly once.

Keys are cached for the whole test (``api_key_cache_seconds``): ingest authenticates against the
store's key table, and with the default five seconds a store outage would refuse every client
after five seconds, whatever the buffer (see the branch's report).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from keel.core.database import Database, create_engine
from keel.firehose.app import create_app
from keel.firehose.registration import MIGRATIONS
from keel.firehose.settings import FirehoseSettings
from tests.firehose.load import Senders, store_counts, until
from tests.support.ledger import create_key
from tests.support.live_server import LiveServer
from tests.support.own_postgres import OwnPostgres, migrated_own_postgres

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 30.0  # the scenario's window, not a wait for anything
SENDERS = 8


@pytest.fixture
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    async with migrated_own_postgres([MIGRATIONS]) as server:
        yield server


async def acknowledged_stored_once(url: str, acknowledged: list[str]) -> None:
    database = Database(create_engine(url))
    try:
        counts = await store_counts(database, [uuid.UUID(i) for i in acknowledged])
    finally:
        await database.dispose()
    missing = [i for i, n in counts.items() if n != 1]
    assert not missing, f"{len(missing)} of {len(counts)} acknowledged ids not stored once"


async def health(client: httpx.AsyncClient) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get("/health")).json()
    return body


async def test_past_the_bound_ingest_answers_buffer_full(
    own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    settings = FirehoseSettings(
        database_url=own_postgres.url,
        spool_path=tmp_path / "spool.db",
        buffer="spool",
        buffer_max_events=20,
        flush_age_ms=5,
        access_log=False,
    )
    key = await create_key(own_postgres.url)
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://firehose.test",
            headers={"Authorization": f"Bearer {key}"},
        ) as client,
    ):
        sent = Senders()

        async def post(count: int) -> httpx.Response:
            ids = [str(uuid.uuid4()) for _ in range(count)]
            body = [{"event_id": i, "user_id": "bound", "timestamp": time.time()} for i in ids]
            reply = await client.post("/events/batch", json=body)
            sent.record(reply, ids)
            refused.extend([] if reply.status_code == 202 else ids)
            return reply

        refused: list[str] = []
        assert (await post(1)).status_code == 202  # the key is cached from here on
        await until(lambda: _depth(client, 0), 30, "the first event to be stored")
        await asyncio.to_thread(own_postgres.stop_hard)

        assert [(await post(n)).status_code for n in (5, 5, 5)] == [202, 202, 202]
        full = await post(10)  # 15 + 10 > 20: refused whole
        assert full.status_code == 503, full.text
        assert full.json()["code"] == "buffer_full" and full.headers["retry-after"] == "1"
        assert (await post(5)).status_code == 202  # exactly up to the bound
        assert (await post(1)).json()["code"] == "buffer_full"
        body = await health(client)
        assert body["buffer"]["depth"] == 20 and body["buffer"]["max_events"] == 20
        assert body["store"]["status"] == "down"

        await asyncio.to_thread(own_postgres.start)
        await until(lambda: _depth(client, 0), 60, "the spool to drain")
    assert sent.wrong == []
    await acknowledged_stored_once(own_postgres.url, sent.acknowledged)
    database = Database(create_engine(own_postgres.url))
    try:
        counts = await store_counts(database, [uuid.UUID(i) for i in refused])
    finally:
        await database.dispose()
    assert len(refused) == 11 and set(counts.values()) == {0}  # nothing partial


async def _depth(client: httpx.AsyncClient, wanted: int) -> bool:
    return bool((await health(client))["buffer"]["depth"] == wanted)


def spool_server(url: str, tmp_path: Path, **env: str) -> LiveServer:
    return LiveServer(
        url,
        tmp_path,
        workers=2,
        service="firehose",
        env={
            "KEEL_FIREHOSE_BUFFER": "spool",
            "KEEL_FIREHOSE_SPOOL_PATH": str(tmp_path / "spool.db"),
            **env,
        },
    )


def client_of(server: LiveServer, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {key}"},
        limits=httpx.Limits(max_connections=SENDERS + 2),
        timeout=httpx.Timeout(30.0),
    )


async def key_cached_in_every_worker(server: LiveServer, key: str) -> None:
    """Authenticate on fresh connections until every worker has looked the key up.

    A worker that first sees the key during the outage cannot look it up in the store, and
    answers 503 database_unavailable: the key table lives in the store, not in the buffer.
    """

    async def every_worker_served() -> bool:
        async with client_of(server, key) as fresh:
            await fresh.get("/events", params={"limit": 1})
        return len(server.requests_served("GET", "/events")) >= server.workers

    await until(every_worker_served, 30, "every worker to authenticate the key")


async def test_store_down_for_30s_ingest_continues_and_drains_after(
    own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    key = await create_key(own_postgres.url)
    server = spool_server(own_postgres.url, tmp_path).start()
    processes = set(server.members())
    sent = Senders()
    try:
        await key_cached_in_every_worker(server, key)
        async with client_of(server, key) as client:
            senders = [asyncio.create_task(sent.sender(client, seed)) for seed in range(SENDERS)]
            await until(lambda: sent.accepted("before") >= 200, 60, "202s before the outage")

            sent.phase = "down"
            await asyncio.to_thread(own_postgres.stop_hard)
            started = time.monotonic()
            await until(lambda: _store_down(client), 20, "/health to show the store down")
            first = (await health(client))["buffer"]["depth"]
            await until(lambda: _depth_past(client, first + 500), 20, "the spool to grow")
            await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - started)))
            during = await health(client)
            assert during["store"]["status"] == "down"

            sent.phase = "after"
            await asyncio.to_thread(own_postgres.start)
            await until(lambda: sent.accepted("after") >= 200, 60, "202s after the outage")
            sent.stop.set()
            await asyncio.wait_for(asyncio.gather(*senders), 40)
            await until(lambda: _depth(client, 0), 120, "the spool to drain")
            after = await health(client)
        assert server.process is not None and server.process.poll() is None
        assert set(server.members()) == processes  # no worker died or was replaced
    finally:
        server.stop()
    print(dict(sent.answers), during["buffer"], after["store"])
    assert sent.wrong == []
    assert sent.accepted("down") >= 500  # ingest went on for the whole outage
    assert during["buffer"]["depth"] > first
    assert after["store"]["status"] == "ok"
    await acknowledged_stored_once(own_postgres.url, sent.acknowledged)


async def _store_down(client: httpx.AsyncClient) -> bool:
    return bool((await health(client))["store"]["status"] == "down")


async def _depth_past(client: httpx.AsyncClient, depth: int) -> bool:
    return bool((await health(client))["buffer"]["depth"] > depth)


def spooled_events(spool: Path) -> int:
    with sqlite3.connect(spool) as db:
        (depth,) = db.execute("SELECT events FROM spool_depth").fetchone()
    return int(depth)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_kill_9_under_load_then_every_202_is_stored_once(
    database_url: str, tmp_path: Path
) -> None:
    key = await create_key(database_url)
    # Flushes every 2 s: the kill surely finds acknowledged events still only in the spool.
    server = spool_server(
        database_url, tmp_path, KEEL_FIREHOSE_FLUSH_AGE_MS="2000", KEEL_FIREHOSE_FLUSH_SIZE="100000"
    ).start()
    sent = Senders(cut_expected=True)
    try:
        async with client_of(server, key) as client:
            senders = [asyncio.create_task(sent.sender(client, seed)) for seed in range(SENDERS)]
            await until(lambda: len(sent.acknowledged) >= 3_000, 120, "3,000 events acknowledged")
            server.kill()  # SIGKILL to every process, requests in flight
            await asyncio.wait_for(asyncio.gather(*senders), 60)
        assert spooled_events(tmp_path / "spool.db") > 0  # the spool held some of them

        server.start()  # same spool file, same store, new processes
        async with client_of(server, key) as client:
            await until(lambda: _depth(client, 0), 120, "the spool to drain after the restart")
    finally:
        server.stop()
    assert sent.wrong == []
    await acknowledged_stored_once(database_url, sent.acknowledged)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_sustained_overload_keeps_every_worker_small(
    own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    """The store down, the spool full: 64 clients keep sending 1,000-event batches; every one
    past the bound is 503 buffer_full, and no worker grows past 300 MB (the issue's bound)."""
    key = await create_key(own_postgres.url)
    server = spool_server(
        own_postgres.url, tmp_path, KEEL_FIREHOSE_BUFFER_MAX_EVENTS="20000", KEEL_ACCESS_LOG="false"
    )
    with server:
        await key_cached_in_every_worker(server, key)
        await asyncio.to_thread(own_postgres.stop_hard)
        batch = [
            {"user_id": f"u{n}", "timestamp": time.time(), "metadata": {"n": n}}
            for n in range(1000)
        ]
        statuses: Counter[tuple[int, str]] = Counter()
        peak: dict[int, float] = {}
        stop = asyncio.Event()

        async def sender(client: httpx.AsyncClient) -> None:
            while not stop.is_set():
                reply = await client.post("/events/batch", json=batch)
                statuses[(reply.status_code, reply.json().get("code", ""))] += 1

        async def watch() -> None:
            while not stop.is_set():
                for pid in server.worker_pids():
                    peak[pid] = max(peak.get(pid, 0.0), _rss_mb(pid))
                await asyncio.sleep(0.2)  # a sampling interval, not a wait for anything

        async with httpx.AsyncClient(
            base_url=server.base_url,
            headers={"Authorization": f"Bearer {key}"},
            limits=httpx.Limits(max_connections=64),
            timeout=httpx.Timeout(60.0),
        ) as client:
            tasks = [asyncio.create_task(sender(client)) for _ in range(64)]
            watcher = asyncio.create_task(watch())
            await until(lambda: statuses[(503, "buffer_full")] >= 500, 120, "500 buffer_full")
            stop.set()
            await asyncio.gather(*tasks, watcher)
    assert set(statuses) <= {(202, ""), (503, "buffer_full"), (503, "overloaded")}, statuses
    assert statuses[(202, "")] <= 20  # the bound, in batches of 1,000
    assert peak and max(peak.values()) < 300, peak
