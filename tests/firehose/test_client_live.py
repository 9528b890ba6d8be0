"""The Python client against the real firehose: every captured event stored exactly once."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from keel.core.database import Database, create_engine
from keel.core.migrate import upgrade
from keel.firehose import AsyncClient, Client
from keel.firehose.registration import MIGRATIONS
from tests.firehose.load import store_counts
from tests.support.ledger import create_key
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.slow


def test_sync_and_async_clients_deliver_every_event_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'firehose.db'}"
    asyncio.run(upgrade(url, [MIGRATIONS]))
    key = asyncio.run(create_key(url))
    with LiveServer(url, tmp_path, workers=2, service="firehose") as server:
        ids: list[uuid.UUID] = []
        with Client(server.base_url, key, batch_size=250, flush_interval=0.05) as client:
            ids += [
                client.capture(f"user-{i % 7}", "signup", metadata={"i": i}) for i in range(3_000)
            ]
        assert client.stats.rejected == client.stats.dropped == 0

        async def capture_async() -> list[uuid.UUID]:
            async with AsyncClient(server.base_url, key, batch_size=100) as aclient:
                return [aclient.capture("async-user", "click") for _ in range(1_000)]

        ids += asyncio.run(capture_async())
    assert all(i.version == 7 for i in ids)
    assert set(asyncio.run(_counts(url, ids)).values()) == {1}


async def _counts(url: str, ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    database = Database(create_engine(url))
    try:
        return await store_counts(database, ids)
    finally:
        await database.dispose()
