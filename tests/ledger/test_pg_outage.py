"""PostgreSQL stopped hard under posting load, then started again, with the same ledger running.

The test starts its own PostgreSQL (never the shared one), runs a two-worker ledger on it, fires
postings from many concurrent clients, stops the database with ``pg_ctl -m immediate`` and starts
it again. Every request must be answered within a bound and never with ``internal_error``; the
server must post again by itself; and every 201 a client saw must be in the database.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from keel.core.database import Database, create_engine
from keel.ledger.registration import MIGRATIONS as LEDGER_MIGRATIONS
from keel.ledger.tables import entries
from tests.ledger.helpers import new_user
from tests.support.ledger import accounts, assert_consistent, create_key
from tests.support.live_server import LiveServer
from tests.support.own_postgres import OwnPostgres, migrated_own_postgres

pytestmark = pytest.mark.slow

POSTERS = 32
REPLY_BOUND = 30.0  # seconds; a reply slower than this counts as a hang
ACCOUNTS = 8
# What a posting may be answered with while the database comes and goes.
ALLOWED = {
    (201, None),
    (503, "database_unavailable"),
    (503, "overloaded"),
    (503, "service_unavailable"),
    (502, "outcome_unknown"),
}


@pytest.fixture
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    async with migrated_own_postgres([LEDGER_MIGRATIONS]) as server:
        yield server


@dataclass
class Tally:
    """Every answer the clients got, by phase, and every 201's body."""

    ids: list[int]
    phase: str = "before"
    answers: Counter[tuple[str, int, str | None]] = field(default_factory=Counter)
    acknowledged: list[dict[str, Any]] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    keys: itertools.count[int] = field(default_factory=itertools.count)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def count(self, phase: str, status: int | None = None) -> int:
        return sum(n for (p, s, _), n in self.answers.items() if p == phase and status in (None, s))

    async def poster(self, client: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            body = {"user_id": rng.choice(self.ids), "amount": rng.randint(1, 100)}
            headers = {"Idempotency-Key": f"outage-{next(self.keys)}"} if rng.random() < 0.5 else {}
            try:
                reply = await client.post("/transactions", json=body, headers=headers)
            except httpx.TimeoutException:
                self.wrong.append(f"no answer within {REPLY_BOUND}s ({self.phase})")
                continue
            except httpx.TransportError as exc:
                self.wrong.append(f"transport error {exc!r} ({self.phase})")
                continue
            self.record(reply)
            if reply.status_code != 201:
                await asyncio.sleep(0.02)  # a client's back-off before it tries again

    def record(self, reply: httpx.Response) -> None:
        code = None if reply.status_code == 201 else reply.json().get("code")
        self.answers[(self.phase, reply.status_code, code)] += 1
        if (reply.status_code, code) not in ALLOWED:
            self.wrong.append(f"{reply.status_code} {reply.text}")
        elif reply.status_code == 201:
            self.acknowledged.append(reply.json())
        elif reply.status_code == 503 and reply.headers.get("retry-after") != "1":
            self.wrong.append(f"503 without Retry-After: {reply.text}")
        elif reply.status_code == 502 and "retry-after" in reply.headers:
            self.wrong.append(f"outcome_unknown with Retry-After: {reply.text}")


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}") from None


async def test_postgres_stopped_hard_under_load(own_postgres: OwnPostgres, tmp_path: Path) -> None:
    key = await create_key(own_postgres.url)
    server = LiveServer(own_postgres.url, tmp_path, workers=2).start()
    processes = set(server.members())  # uvicorn replaces a dead worker: its pid would change
    try:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as setup:
            users = [await new_user(setup) for _ in range(ACCOUNTS)]
        tally = Tally([u["id"] for u in users])
        client = httpx.AsyncClient(
            base_url=server.base_url,
            headers=headers,
            limits=httpx.Limits(max_connections=POSTERS),
            timeout=httpx.Timeout(REPLY_BOUND),
        )
        async with client:
            posters = [asyncio.create_task(tally.poster(client, seed)) for seed in range(POSTERS)]
            await until(lambda: tally.count("before", 201) >= 200, 120, "200 postings")
            tally.phase = "down"
            await asyncio.to_thread(own_postgres.stop_hard)
            await until(
                lambda: tally.count("down") - tally.count("down", 201) >= 100, 60, "refusals"
            )
            tally.phase = "restarting"
            await asyncio.to_thread(own_postgres.start)
            tally.phase = "after"
            await until(lambda: tally.count("after", 201) >= 200, 120, "postings to resume")
            tally.stop.set()
            await asyncio.wait_for(asyncio.gather(*posters), REPLY_BOUND + 5)
        assert server.process is not None and server.process.poll() is None  # never restarted
        assert set(server.members()) == processes  # nor any of its workers
    finally:
        server.stop()
    print(dict(tally.answers))  # what the clients were told, for the record
    assert tally.wrong == []
    await _assert_every_201_stored(own_postgres.url, tally)


async def _assert_every_201_stored(url: str, tally: Tally) -> None:
    database = Database(create_engine(url))
    try:
        acknowledged = {reply["id"]: reply for reply in tally.acknowledged}
        async with database.read() as conn:
            rows = await conn.execute(select(entries).where(entries.c.id.in_(acknowledged)))
            stored = {row.id: row for row in rows}
        assert set(stored) == set(acknowledged)
        # Each request was a new posting (a fresh key or none), so a row nobody was told 201
        # about must have been answered outcome_unknown: a 503 there would invite a double post.
        async with database.read() as conn:
            rows = await conn.execute(select(entries.c.id).where(entries.c.user_id.in_(tally.ids)))
            unacknowledged = set(rows.scalars()) - set(acknowledged)
        unknown = sum(n for (_, status, _), n in tally.answers.items() if status == 502)
        assert len(unacknowledged) <= unknown, (len(unacknowledged), dict(tally.answers))
        for entry_id, reply in acknowledged.items():
            row = stored[entry_id]
            assert (row.user_id, row.amount, row.balance_after) == (
                reply["user_id"],
                reply["amount"],
                reply["balance_after"],
            )
        for account in (await accounts(database, tally.ids)).values():
            assert_consistent(account)
    finally:
        await database.dispose()
