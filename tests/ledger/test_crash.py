"""``kill -9`` the whole server under load, restart it, and find every acknowledged posting.

A 201 means committed: the load client records what each 201 said, the server's process group
is killed mid-load (once enough 201s have been seen, not after some time), and a new server on
the same database must pass the audit and hold every recorded entry exactly as acknowledged.
Requests that were in flight when the server died are retried with their Idempotency-Key, which
must neither lose them nor post them twice.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from keel.core.database import Database
from keel.ledger.tables import entries, transfers
from tests.ledger.helpers import deposit, new_user
from tests.support.ledger import accounts, assert_consistent, create_key
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.slow

POSTERS = 32
KILL_AFTER = 300  # acknowledged postings seen before the kill
ACCOUNTS = 6
KEEL = [sys.executable, "-c", "from keel.cli import app; app()"]


@dataclass
class Load:
    """What the load client was told: every acknowledged posting, and what it never heard of."""

    ids: list[int]
    kill_after: int
    acknowledged: list[dict[str, Any]] = field(default_factory=list)
    unanswered: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    refused: int = 0
    enough: asyncio.Event = field(default_factory=asyncio.Event)
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def next_request(self, rng: random.Random) -> tuple[str, dict[str, Any], str]:
        key = f"crash-{next(self.counter)}"
        if rng.random() < 0.3:
            src, dst = rng.sample(self.ids, 2)
            body = {"from_user_id": src, "to_user_id": dst, "amount": rng.randint(1, 50)}
            return "/transfers", body, key
        amount = rng.choice([rng.randint(1, 100), -rng.randint(1, 60)])
        return "/transactions", {"user_id": rng.choice(self.ids), "amount": amount}, key

    async def poster(self, client: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        while True:
            path, body, key = self.next_request(rng)
            try:
                reply = await client.post(path, json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError:  # the server died with this request in flight
                self.unanswered.append((path, body, key))
                return
            if reply.status_code == 201:
                self.acknowledged.append(reply.json())
                if len(self.acknowledged) >= self.kill_after:
                    self.enough.set()
            else:
                assert reply.status_code == 422, reply.text
                assert reply.json()["code"] == "insufficient_funds"
                self.refused += 1


def _entries_of(acknowledged: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The entries the 201 replies described, by id (a transfer describes two)."""
    out: dict[int, dict[str, Any]] = {}
    for reply in acknowledged:
        for entry in reply.get("entries", [reply]):
            out[entry["id"]] = entry
    return out


async def _load_until_killed(server: LiveServer, key: str, load: Load) -> None:
    client = httpx.AsyncClient(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {key}"},
        limits=httpx.Limits(max_connections=POSTERS),
        timeout=httpx.Timeout(30.0),
    )
    async with client:
        posters = [asyncio.create_task(load.poster(client, seed)) for seed in range(POSTERS)]
        await asyncio.wait_for(load.enough.wait(), timeout=120)
        server.kill()  # SIGKILL to every process of the server, requests still in flight
        await asyncio.wait_for(asyncio.gather(*posters), timeout=60)


async def _retry(server: LiveServer, key: str, load: Load) -> list[dict[str, Any]]:
    """Resend what never got an answer, with the same keys: each is posted at most once."""
    async with httpx.AsyncClient(
        base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30.0
    ) as client:
        replies = await asyncio.gather(
            *(
                client.post(path, json=body, headers={"Idempotency-Key": idem})
                for path, body, idem in load.unanswered
            )
        )
    for reply in replies:
        assert reply.status_code in (201, 422), reply.text
    return [r.json() for r in replies if r.status_code == 201]


async def test_kill_9_under_load_loses_no_acknowledged_posting(
    ledger_server: Callable[..., LiveServer], database_url: str, database: Database
) -> None:
    key = await create_key(database_url)
    server = ledger_server(workers=2)
    async with httpx.AsyncClient(
        base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}
    ) as setup:
        users = [await new_user(setup) for _ in range(ACCOUNTS)]
        for user in users:
            await deposit(setup, user["id"], 1_000)
    load = Load([u["id"] for u in users], KILL_AFTER)

    await _load_until_killed(server, key, load)
    assert len(load.acknowledged) >= KILL_AFTER
    assert load.unanswered, "the kill should have cut requests off mid-flight"

    # Straight after the crash, before anything could repair it, the database balances.
    cli = subprocess.run(
        [*KEEL, "ledger", "audit", "--database-url", database_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr

    server.start()  # same database, new processes
    async with httpx.AsyncClient(
        base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}
    ) as client:
        audit = (await client.get("/audit")).json()
    assert audit["ok"] is True, audit

    # Every entry a 201 described is in the database exactly as described.
    acknowledged = _entries_of(load.acknowledged)
    async with database.read() as conn:
        stored = {
            row.id: row
            for row in (
                await conn.execute(select(entries).where(entries.c.id.in_(acknowledged)))
            ).all()
        }
    assert set(stored) == set(acknowledged)
    for entry_id, entry in acknowledged.items():
        row = stored[entry_id]
        assert (row.user_id, row.amount, row.balance_after, row.transfer_id) == (
            entry["user_id"],
            entry["amount"],
            entry["balance_after"],
            entry.get("transfer_id"),
        )

    # Retrying the cut-off requests with their keys posts each at most once: afterwards the
    # accounts hold exactly the entries that some 201 described, no more, no fewer.
    retried = await _retry(server, key, load)
    described = _entries_of([*load.acknowledged, *retried])
    ids = [u["id"] for u in users]
    state = await accounts(database, ids)
    deposits = {e.id for a in state.values() for e in a.entries[:1]}
    assert {e.id for a in state.values() for e in a.entries} == set(described) | deposits
    for account in state.values():
        assert_consistent(account)
    async with database.read() as conn:
        transfer_ids = set(
            (
                await conn.execute(select(transfers.c.id).where(transfers.c.from_user_id.in_(ids)))
            ).scalars()
        )
    assert transfer_ids == {r["id"] for r in [*load.acknowledged, *retried] if "entries" in r}
