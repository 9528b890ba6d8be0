"""Idempotency keys (Stripe semantics): one posting per key, however many copies race in.

The key record is stored in the database with the effect it guards, so it must hold across
worker processes: the racing copies below go over real sockets to a 4-worker server, where they
land in different processes, and the count of entries is read from the database.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from keel.core.auth import Scope
from keel.core.database import Database
from keel.core.tables import idempotency_keys
from keel.ledger.tables import entries, transfers, users
from tests.ledger.conftest import Cluster
from tests.ledger.helpers import deposit, new_user, unique
from tests.support.ledger import accounts, row_counts

COPIES = 20
REPLAYED = "Idempotent-Replayed"


async def _count(database: Database, query: Any) -> int:
    async with database.read() as conn:
        count: int = (await conn.execute(query)).scalar_one()
        return count


async def _key_records(database: Database, key: str) -> list[Any]:
    async with database.read() as conn:
        return list(
            (
                await conn.execute(select(idempotency_keys).where(idempotency_keys.c.key == key))
            ).all()
        )


def _assert_one_reply_replayed_to_all(replies: list[httpx.Response]) -> None:
    """Every copy got the first reply: same status, same body; all but one say they replay."""
    assert {r.status_code for r in replies} == {201}, [r.text for r in replies]
    assert len({r.content for r in replies}) == 1
    assert len({json.dumps(r.json(), sort_keys=True) for r in replies}) == 1
    flags = sorted(r.headers.get(REPLAYED) for r in replies if r.headers.get(REPLAYED))
    assert flags == ["true"] * (len(replies) - 1)


async def _race(
    post: Callable[[], Awaitable[httpx.Response]], copies: int = COPIES
) -> list[httpx.Response]:
    return list(await asyncio.gather(*(post() for _ in range(copies))))


@pytest.mark.slow
async def test_same_key_20_times_at_once_across_processes_posts_once(
    ledger_cluster: Cluster, cluster_db: Database
) -> None:
    key = f"race-{uuid.uuid4()}"
    async with ledger_cluster.client(connections=COPIES) as client:
        user = await new_user(client)
        before = ledger_cluster.server.requests_served("POST", "/transactions")
        replies = await _race(
            lambda: client.post(
                "/transactions",
                json={"user_id": user["id"], "amount": 25, "description": "once"},
                headers={"Idempotency-Key": key},
            )
        )

    _assert_one_reply_replayed_to_all(replies)
    account = (await accounts(cluster_db, [user["id"]]))[user["id"]]
    assert [(e.id, e.amount) for e in account.entries] == [(replies[0].json()["id"], 25)]
    assert account.balance == 25
    records = await _key_records(cluster_db, key)
    assert len(records) == 1 and records[0].response_status == 201
    # The copies really were served by more than one process.
    served = ledger_cluster.server.wait_requests_served("POST", "/transactions", before, COPIES)
    assert len(served) >= 2, served


async def test_same_key_20_times_at_once_in_process_posts_once(
    client: httpx.AsyncClient, database: Database
) -> None:
    user = await new_user(client)
    key = f"race-{uuid.uuid4()}"
    replies = await _race(
        lambda: client.post(
            "/transactions",
            json={"user_id": user["id"], "amount": 7},
            headers={"Idempotency-Key": key},
        )
    )
    _assert_one_reply_replayed_to_all(replies)
    assert await _count(database, select(func.count()).where(entries.c.user_id == user["id"])) == 1
    assert len(await _key_records(database, key)) == 1


async def test_replay_after_the_fact_returns_the_first_reply(
    client: httpx.AsyncClient, database: Database
) -> None:
    user = await new_user(client)
    body = {"user_id": user["id"], "amount": 300, "description": "rent"}
    headers = {"Idempotency-Key": unique("key")}
    first = await client.post("/transactions", json=body, headers=headers)
    # Key order and whitespace do not make a different request.
    again = await client.post(
        "/transactions",
        content=json.dumps(dict(reversed(body.items())), indent=2),
        headers={**headers, "Content-Type": "application/json"},
    )
    assert first.status_code == 201 and REPLAYED not in first.headers
    assert again.status_code == 201 and again.headers[REPLAYED] == "true"
    assert again.json() == first.json()
    assert await _count(database, select(func.count()).where(entries.c.user_id == user["id"])) == 1


async def test_same_key_different_body_is_refused(
    client: httpx.AsyncClient, database: Database
) -> None:
    user = await new_user(client)
    headers = {"Idempotency-Key": unique("key")}
    first = await client.post(
        "/transactions", json={"user_id": user["id"], "amount": 10}, headers=headers
    )
    before = await row_counts(database)
    reused = await client.post(
        "/transactions", json={"user_id": user["id"], "amount": 11}, headers=headers
    )
    assert first.status_code == 201
    assert reused.status_code == 422
    assert reused.headers["content-type"].startswith("application/problem+json")
    assert reused.json()["code"] == "idempotency_key_reused"
    assert await row_counts(database) == before


async def test_same_key_on_another_operation_is_refused(client: httpx.AsyncClient) -> None:
    alice, bob = await new_user(client), await new_user(client)
    await deposit(client, alice["id"], 100)
    headers = {"Idempotency-Key": unique("key")}
    posted = await client.post(
        "/transactions", json={"user_id": alice["id"], "amount": 5}, headers=headers
    )
    moved = await client.post(
        "/transfers",
        json={"from_user_id": alice["id"], "to_user_id": bob["id"], "amount": 5},
        headers=headers,
    )
    assert posted.status_code == 201
    assert moved.status_code == 422 and moved.json()["code"] == "idempotency_key_reused"


@pytest.mark.parametrize(
    "key", ["k" * 256, "", "caf\u00e9", "tab\there"], ids=["256-chars", "empty", "non-ascii", "tab"]
)
async def test_invalid_key_is_refused_and_writes_nothing(
    client: httpx.AsyncClient, database: Database, key: str
) -> None:
    user = await new_user(client)
    before = await row_counts(database)
    response = await client.post(
        "/transactions",
        json={"user_id": user["id"], "amount": 1},
        headers=[("Idempotency-Key", key.encode("utf-8"))],
    )
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_idempotency_key"
    assert await row_counts(database) == before


async def test_key_of_255_chars_is_accepted(client: httpx.AsyncClient) -> None:
    user = await new_user(client)
    key = uuid.uuid4().hex + "k" * (255 - 32)
    replies = [
        await client.post(
            "/transactions",
            json={"user_id": user["id"], "amount": 1},
            headers={"Idempotency-Key": key},
        )
        for _ in range(2)
    ]
    assert [r.status_code for r in replies] == [201, 201]
    assert replies[1].headers[REPLAYED] == "true"


async def test_keys_are_scoped_per_api_key(
    client: httpx.AsyncClient, database: Database, make_key: Any, ledger_app: Any
) -> None:
    user = await new_user(client)
    other_key = await make_key(Scope.WRITE)
    headers = {"Idempotency-Key": unique("shared")}
    body = {"user_id": user["id"], "amount": 40}
    mine = await client.post("/transactions", json=body, headers=headers)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=ledger_app),
        base_url="http://ledger.test",
        headers={"X-API-Key": other_key},
    ) as other:
        theirs = await other.post("/transactions", json=body, headers=headers)
    assert mine.status_code == theirs.status_code == 201
    assert REPLAYED not in theirs.headers
    assert mine.json()["id"] != theirs.json()["id"]
    assert await _count(database, select(func.count()).where(entries.c.user_id == user["id"])) == 2


async def test_refused_posting_does_not_burn_its_key(
    client: httpx.AsyncClient, database: Database
) -> None:
    """Only successes are stored: a retry of a refused request with its key runs again."""
    user = await new_user(client)
    headers = {"Idempotency-Key": unique("key")}
    body = {"user_id": user["id"], "amount": -50}
    refused = await client.post("/transactions", json=body, headers=headers)
    await deposit(client, user["id"], 50)
    retried = await client.post("/transactions", json=body, headers=headers)
    assert refused.status_code == 422 and refused.json()["code"] == "insufficient_funds"
    assert retried.status_code == 201 and REPLAYED not in retried.headers
    assert retried.json()["balance_after"] == 0


async def test_create_user_is_idempotent(client: httpx.AsyncClient, database: Database) -> None:
    username = unique("idem")
    headers = {"Idempotency-Key": unique("key")}
    replies = await _race(
        lambda: client.post("/users", json={"username": username}, headers=headers), copies=10
    )
    _assert_one_reply_replayed_to_all(replies)
    assert await _count(database, select(func.count()).where(users.c.username == username)) == 1
    # Without the key the same body is a second request, and the username is taken.
    again = await client.post("/users", json={"username": username})
    assert again.status_code == 409 and again.json()["code"] == "username_taken"


async def test_create_transfer_is_idempotent(client: httpx.AsyncClient, database: Database) -> None:
    alice, bob = await new_user(client), await new_user(client)
    await deposit(client, alice["id"], 100)
    headers = {"Idempotency-Key": unique("key")}
    body = {"from_user_id": alice["id"], "to_user_id": bob["id"], "amount": 30}
    replies = await _race(lambda: client.post("/transfers", json=body, headers=headers), copies=10)
    _assert_one_reply_replayed_to_all(replies)
    assert (
        await _count(
            database,
            select(func.count()).where(
                transfers.c.from_user_id == alice["id"], transfers.c.to_user_id == bob["id"]
            ),
        )
        == 1
    )
    state = await accounts(database, [alice["id"], bob["id"]])
    assert (state[alice["id"]].balance, state[bob["id"]].balance) == (70, 30)
