"""Per-key rate limits: 429 `rate_limited` with Retry-After, per process or shared via Redis."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import insert

from keel.core.auth import Scope, hash_key
from keel.core.database import Database
from keel.core.errors import RateLimited
from keel.core.ratelimit import LocalLimit, RateLimiter
from keel.core.tables import api_keys
from keel.ledger.settings import LedgerSettings
from tests.support.apps import ledger_client


async def _key_with_fresh_id(database: Database) -> str:
    """An admin key whose id no earlier run used, so Redis holds no old count for it."""
    raw = f"keel_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    async with database.write() as conn:
        await conn.execute(
            insert(api_keys).values(
                id=secrets.randbelow(2**40) + 2**41,
                prefix=raw[:13],
                key_hash=hash_key(raw),
                scope=Scope.ADMIN.value,
                name="rate limit test",
                created_at=datetime.now(UTC),
            )
        )
    return raw


@asynccontextmanager
async def _ledger(
    database_url: str, rate_limit: str, redis_url: str | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """A ledger app of its own, with its own limiter, and a client talking to it."""
    settings = LedgerSettings(
        database_url=database_url, rate_limit=rate_limit, redis_url=redis_url, access_log=False
    )
    async with ledger_client(settings) as client:
        yield client


def _assert_rate_limited(response: httpx.Response, window_seconds: int) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "rate_limited"
    assert 1 <= int(response.headers["Retry-After"]) <= window_seconds


async def test_over_the_limit_is_429_with_retry_after(
    database_url: str, database: Database
) -> None:
    key = await _key_with_fresh_id(database)
    other = await _key_with_fresh_id(database)
    async with _ledger(database_url, "3/minute") as client:
        auth = {"Authorization": f"Bearer {key}"}
        allowed = [await client.get("/users/1", headers=auth) for _ in range(3)]
        refused = await client.get("/users/1", headers=auth)
        another_key = await client.get("/users/1", headers={"X-API-Key": other})
        unauthenticated = await client.get("/health")
    assert all(r.status_code in (200, 404) for r in allowed)
    _assert_rate_limited(refused, 60)
    assert another_key.status_code in (200, 404)  # the limit is per key
    assert unauthenticated.status_code == 200


async def test_every_limit_of_a_list_applies(database_url: str, database: Database) -> None:
    key = await _key_with_fresh_id(database)
    async with _ledger(database_url, "100/second;2/hour") as client:
        auth = {"Authorization": f"Bearer {key}"}
        replies = [await client.get("/users/1", headers=auth) for _ in range(3)]
    assert [r.status_code == 429 for r in replies] == [False, False, True]
    _assert_rate_limited(replies[-1], 3600)


async def test_redis_limiters_in_two_processes_share_one_count(redis_url: str) -> None:
    """Two limiter instances (as two worker processes would hold) count against one budget."""
    namespace = f"test-{uuid.uuid4().hex}"
    first = RateLimiter("5/minute", redis_url, namespace)
    second = RateLimiter("5/minute", redis_url, namespace)
    for limiter in (first, second, first, second, first):
        await limiter.check("key-1")
    for limiter in (first, second):
        with pytest.raises(RateLimited) as refused:
            await limiter.check("key-1")
        assert 1 <= int(refused.value.headers["Retry-After"]) <= 60
    await second.check("key-2")  # another identity has its own budget


async def test_redis_limit_holds_across_two_apps(
    database_url: str, database: Database, redis_url: str
) -> None:
    """Two ledger apps on one Redis: the second refuses what the first already counted."""
    key = await _key_with_fresh_id(database)
    auth = {"Authorization": f"Bearer {key}"}
    async with (
        _ledger(database_url, "4/minute", redis_url) as one,
        _ledger(database_url, "4/minute", redis_url) as two,
    ):
        replies = [await client.get("/users/1", headers=auth) for client in (one, two, one, two)]
        refused = [await one.get("/users/1", headers=auth), await two.get("/users/1", headers=auth)]
    assert all(r.status_code in (200, 404) for r in replies)
    for response in refused:
        _assert_rate_limited(response, 60)


async def test_memory_limiters_count_alone() -> None:
    """Without Redis each process has its own budget (the documented trade-off)."""
    first, second = RateLimiter("1/minute", None, "m"), RateLimiter("1/minute", None, "m")
    await first.check("k")
    await second.check("k")
    with pytest.raises(RateLimited):
        await first.check("k")


def test_the_local_limit_slides_across_windows() -> None:
    """The previous window counts by the share of it the sliding window still covers."""
    limit = LocalLimit(amount=10, window=60.0)
    start = 6000.0  # the start of a window
    assert [limit.hit("k", start + 1) for _ in range(10)] == [None] * 10
    assert limit.hit("k", start + 30) == pytest.approx(60 - 30 + 60 * (1 - 10 / 10))
    # Half-way through the next window, half of the previous ten still count: five more pass.
    halfway = start + 60 + 30
    assert [limit.hit("k", halfway) for _ in range(5)] == [None] * 5
    # 10 * (60 - t) / 60 + 5 < 10 only once t > 30: refused at 30 s, let through just after.
    assert limit.hit("k", halfway) == pytest.approx(0)
    assert limit.hit("k", halfway + 0.5) is None
    assert limit.hit("other", halfway) is None  # per identity


def test_the_local_limit_forgets_idle_callers() -> None:
    limit = LocalLimit(amount=1, window=1.0)
    for n in range(1000):
        limit.hit(f"caller-{n}", 100.5)
    limit.hit("late", 103.5)  # two windows on: everyone idle since is dropped
    assert set(limit._counts) == {"late"}


async def test_health_shows_the_limiter_backend(client: httpx.AsyncClient) -> None:
    body = (await client.get("/health")).json()
    assert body["rate_limit"] == {"backend": "memory", "status": "ok"}
