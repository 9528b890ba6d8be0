"""Money under real concurrency: many HTTP clients, four worker processes, checked in the database.

Each claim is sent over real sockets to ``keel serve ledger --workers 4``, so the requests race
in different processes and only the database can serialise them. The verdict is read from the
database afterwards, never from the replies alone.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import httpx
import pytest

from keel.core.database import Database
from tests.ledger.conftest import Cluster
from tests.ledger.helpers import deposit, new_user
from tests.support.ledger import accounts, assert_consistent, outbox_events_by_entry

pytestmark = pytest.mark.slow


async def test_200_concurrent_withdrawals_of_1_against_100(
    ledger_cluster: Cluster, cluster_db: Database
) -> None:
    async with ledger_cluster.client(connections=250) as client:
        user = await new_user(client)
        await deposit(client, user["id"], 100)
        served_before = ledger_cluster.server.requests_served("POST", "/transactions")
        replies = await asyncio.gather(
            *(
                client.post(
                    "/transactions",
                    json={"user_id": user["id"], "amount": -1, "description": f"w{i}"},
                )
                for i in range(200)
            )
        )

    assert Counter(r.status_code for r in replies) == {201: 100, 422: 100}
    # The race really ran in several processes (each worker counts what it served).
    served = ledger_cluster.server.wait_requests_served(
        "POST", "/transactions", served_before, len(replies)
    )
    assert len(served) >= 2, served
    for refused in (r for r in replies if r.status_code == 422):
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["code"] == "insufficient_funds"

    account = (await accounts(cluster_db, [user["id"]]))[user["id"]]
    assert account.balance == 0
    assert len(account.entries) == 101
    withdrawals = [e for e in account.entries if e.amount < 0]
    assert len(withdrawals) == 100 and {e.amount for e in withdrawals} == {-1}
    # Every withdrawal saw a different balance: none was applied to a stale one.
    assert sorted(e.balance_after for e in withdrawals) == list(range(100))
    assert_consistent(account)
    # The 201s name exactly the entries in the database.
    posted = {r.json()["id"] for r in replies if r.status_code == 201}
    assert posted == {e.id for e in withdrawals}
    # Each entry committed with exactly one outbox event announcing it.
    events = await outbox_events_by_entry(cluster_db)
    assert all(len(events.get(e.id, [])) == 1 for e in account.entries)


ACCOUNTS = 5
OPENING = 1_000
OVERDRAFTS = [0, 0, 50, 200, 0]


async def _random_transfers(
    client: httpx.AsyncClient, ids: list[int], count: int, seed: int
) -> list[tuple[dict[str, Any], httpx.Response]]:
    rng = random.Random(seed)
    bodies = []
    for i in range(count):
        src, dst = rng.sample(ids, 2)
        bodies.append(
            {
                "from_user_id": src,
                "to_user_id": dst,
                "amount": rng.randint(1, 400),
                "description": f"t{seed}-{i}",
            }
        )
    replies = await asyncio.gather(*(client.post("/transfers", json=b) for b in bodies))
    return list(zip(bodies, replies, strict=True))


async def test_concurrent_transfers_conserve_money(
    ledger_cluster: Cluster, cluster_db: Database
) -> None:
    async with ledger_cluster.client() as setup:
        users = [await new_user(setup, overdraft_limit=limit) for limit in OVERDRAFTS]
        ids = [u["id"] for u in users]
        for user_id in ids:
            await deposit(setup, user_id, OPENING)
        served_before = ledger_cluster.server.requests_served("POST", "/transfers")
        # Eight independent clients, each with its own connection pool, firing at once.
        clients = [ledger_cluster.client(connections=40) for _ in range(8)]
        try:
            batches = await asyncio.gather(
                *(_random_transfers(c, ids, 60, seed) for seed, c in enumerate(clients))
            )
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))
        audit = (await setup.get("/audit")).json()

    results = [pair for batch in batches for pair in batch]
    served = ledger_cluster.server.wait_requests_served(
        "POST", "/transfers", served_before, len(results)
    )
    assert len(served) >= 2, served
    statuses = Counter(reply.status_code for _, reply in results)
    assert set(statuses) <= {201, 422}, statuses
    assert statuses[201] > 0
    assert {r.json()["code"] for _, r in results if r.status_code == 422} <= {"insufficient_funds"}
    assert audit["ok"] is True, audit

    state = await accounts(cluster_db, ids)
    assert sum(a.balance for a in state.values()) == ACCOUNTS * OPENING
    for account in state.values():
        assert account.balance >= -account.overdraft_limit
        assert_consistent(account)
    # The database holds exactly the transfers that were acknowledged, each as two entries.
    by_transfer: dict[int, list[Any]] = {}
    for account in state.values():
        for entry in account.entries:
            if entry.transfer_id is not None:
                by_transfer.setdefault(entry.transfer_id, []).append(entry)
    acknowledged = {r.json()["id"]: body for body, r in results if r.status_code == 201}
    assert set(by_transfer) == set(acknowledged)
    for transfer_id, legs in by_transfer.items():
        body = acknowledged[transfer_id]
        assert sorted((e.user_id, e.amount) for e in legs) == sorted(
            [(body["from_user_id"], -body["amount"]), (body["to_user_id"], body["amount"])]
        )
