"""``kill -9`` the firehose under load, restart it, and find every acknowledged event once.

The direct buffer (SQLite store) here; the spool and Redis buffers prove the same in their own
modules. The server's whole process group dies once enough 202s were seen (not after some
time); senders keep going against the dead port, then against the restarted server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from keel.core.migrate import upgrade
from keel.firehose.registration import MIGRATIONS
from tests.support.firehose import Sender, assert_each_stored_once, stored_counts
from tests.support.ledger import create_key
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.slow


async def _wait_for(condition: object, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


async def test_kill_9_loses_no_acknowledged_event_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'firehose.db'}"
    await upgrade(url, [MIGRATIONS])
    key = await create_key(url)
    server = LiveServer(url, tmp_path, workers=2, service="firehose")
    await asyncio.to_thread(server.start)
    try:
        sender = Sender(key)
        stop = asyncio.Event()
        load = asyncio.create_task(sender.run(server.base_url, 32, stop))
        await _wait_for(lambda: sender.acked_at_least(2_000), 60)
        await asyncio.to_thread(server.kill)  # senders meet a dead port meanwhile
        stop.set()
        await load
        before_restart = len(sender.acknowledged)
        await asyncio.to_thread(server.start)
        stop = asyncio.Event()
        load = asyncio.create_task(sender.run(server.base_url, 32, stop))
        await _wait_for(lambda: sender.acked_at_least(before_restart + 500), 60)
        stop.set()
        await load
    finally:
        await asyncio.to_thread(server.stop)
    assert sender.statuses[202] > 0
    assert set(sender.statuses) <= {202}, sender.codes
    assert_each_stored_once(await stored_counts(url, sender.acknowledged))
