"""``kill -9`` the firehose under load, restart it, and find every acknowledged event once.

The direct buffer (SQLite store) here; the spool and Redis buffers prove the same in their own
modules. The server's whole process group dies once enough 202s were seen (not after some
time); then a restarted server takes more, and the store must hold every 202'd id exactly once.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from keel.core.database import Database, create_engine
from keel.core.migrate import upgrade
from keel.firehose.registration import MIGRATIONS
from tests.firehose.load import Senders, store_counts, until
from tests.support.ledger import create_key
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.slow


async def send(server: LiveServer, key: str, senders: Senders, clients: int = 32) -> None:
    async with httpx.AsyncClient(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx.Timeout(30.0),
        limits=httpx.Limits(max_connections=clients),
    ) as client:
        await asyncio.gather(*(senders.sender(client, seed) for seed in range(clients)))


async def test_kill_9_loses_no_acknowledged_event_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'firehose.db'}"
    await upgrade(url, [MIGRATIONS])
    key = await create_key(url)
    server = LiveServer(url, tmp_path, workers=2, service="firehose")
    senders = Senders(cut_expected=True)
    await asyncio.to_thread(server.start)
    try:
        load = asyncio.create_task(send(server, key, senders))
        await until(lambda: len(senders.acknowledged) >= 2_000, 60, "2,000 acknowledged events")
        await asyncio.to_thread(server.kill)
        await load  # every sender ends on its lost connection
        await asyncio.to_thread(server.start)
        senders.phase, senders.cut_expected = "after", False
        load = asyncio.create_task(send(server, key, senders))
        await until(lambda: senders.accepted("after") >= 100, 60, "202s from the restarted server")
        senders.stop.set()
        await load
    finally:
        await asyncio.to_thread(server.stop)
    assert not senders.wrong, senders.wrong[:5]
    database = Database(create_engine(url))
    try:
        counts = await store_counts(database, [uuid.UUID(i) for i in senders.acknowledged])
    finally:
        await database.dispose()
    assert counts and set(counts.values()) == {1}, "an acknowledged event is missing or doubled"
