"""Rate limiting fails open: a Redis that is stopped or hangs never turns requests into 500s.

Every test here runs its own ``redis-server`` (tests.support.redis_server) and stops or freezes
that one; the shared Redis is never touched.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from keel.core.database import Database, create_engine
from keel.core.errors import RateLimited
from keel.core.ratelimit import REDIS_CONNECTIONS_PER_PROCESS, Breaker, RateLimiter
from keel.ledger.registration import MIGRATIONS as LEDGER_MIGRATIONS
from keel.ledger.settings import LedgerSettings
from tests import backends
from tests.core.test_ratelimit import _key_with_fresh_id
from tests.support.apps import ledger_client
from tests.support.redis_server import PrivateRedis

BOUND_SECONDS = 1.0  # far above the limiter's 50 ms timeout, far below a request hung on Redis
BACKOFF_SECONDS = 0.3


class Clock:
    """A hand-moved clock for the limiter's back-off and windows."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A running private Redis, stopped after the test whatever state it was left in."""
    if shutil.which("redis-server") is None:
        backends.require("redis", "redis-server is not installed (outage tests start their own)")
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return backends.migrated_sqlite_url(tmp_path, [LEDGER_MIGRATIONS])


@pytest.fixture
async def sqlite_ledger(sqlite_url: str) -> AsyncIterator[tuple[str, str]]:
    """A migrated SQLite ledger database and an admin key in it (the database plays no part)."""
    url = sqlite_url
    database = Database(create_engine(url))
    try:
        yield url, await _key_with_fresh_id(database)
    finally:
        await database.dispose()


@asynccontextmanager
async def _ledger(database_url: str, redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = LedgerSettings(
        database_url=database_url,
        rate_limit="1000/minute",
        redis_url=redis_url,
        rate_limit_redis_backoff_seconds=BACKOFF_SECONDS,
        access_log=False,
    )
    async with ledger_client(settings) as client:
        yield client


async def _timed_get(client: httpx.AsyncClient, key: str) -> httpx.Response:
    """An authenticated request that must get the ledger's normal answer within the bound."""
    started = time.monotonic()
    response = await client.get("/users/1", headers={"Authorization": f"Bearer {key}"})
    assert time.monotonic() - started < BOUND_SECONDS, "a request waited on Redis"
    assert response.status_code == 404, response.text  # no such user: the route ran
    return response


async def _metric(client: httpx.AsyncClient, name: str) -> float:
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("service") == "ledger":
                return sample.value
    return 0.0


async def _counted_in_redis(url: str) -> int:
    """How many requests the limiter has counted in this Redis (all windows, all keys)."""
    client = aioredis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match="keel:ledger:*")]
        return sum([int(await client.get(key) or 0) for key in keys])
    finally:
        await client.aclose()


async def _wait_for_health(client: httpx.AsyncClient, status: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while True:
        body = (await client.get("/health")).json()
        if body["rate_limit"]["status"] == status:
            return dict(body)
        assert time.monotonic() < deadline, f"/health never showed {status}: {body}"
        await asyncio.sleep(0.05)  # poll interval: the back-off has to pass before a probe


async def _outage_and_recovery(
    client: httpx.AsyncClient, key: str, redis: PrivateRedis, cause: str, end: str
) -> None:
    """Requests pass during the outage, which /metrics and /health show, and counting resumes."""
    errors_before = await _metric(client, "keel_rate_limit_backend_errors_total")
    for _ in range(10):
        await _timed_get(client, key)
    assert await _metric(client, "keel_rate_limit_backend_errors_total") > errors_before
    assert await _metric(client, "keel_rate_limit_fallback_checks_total") >= 10
    health = await _wait_for_health(client, "failing")
    assert health["status"] == "degraded"
    assert health["rate_limit"] == {"backend": "redis", "status": "failing", "last_error": cause}

    {"restart": redis.start, "thaw": redis.thaw}[end]()
    await _wait_for_health(client, "ok")
    counted = await _counted_in_redis(redis.url)
    for _ in range(3):
        await _timed_get(client, key)
    assert await _counted_in_redis(redis.url) == counted + 3


async def test_a_stopped_redis_lets_requests_through_then_counts_again(
    sqlite_ledger: tuple[str, str], private_redis: PrivateRedis
) -> None:
    database_url, key = sqlite_ledger
    async with _ledger(database_url, private_redis.url) as client:
        await _timed_get(client, key)
        assert await _counted_in_redis(private_redis.url) == 1
        assert (await client.get("/health")).json()["rate_limit"]["status"] == "ok"
        private_redis.stop()
        await _outage_and_recovery(client, key, private_redis, "ConnectionError", "restart")


async def test_a_hung_redis_lets_requests_through_within_the_timeout(
    sqlite_ledger: tuple[str, str], private_redis: PrivateRedis
) -> None:
    database_url, key = sqlite_ledger
    async with _ledger(database_url, private_redis.url) as client:
        await _timed_get(client, key)
        private_redis.freeze()
        await _outage_and_recovery(client, key, private_redis, "TimeoutError", "thaw")


def _counts(namespace: str) -> tuple[float, float]:
    """(backend errors, local fallbacks) counted so far for ``namespace``."""
    labels = {"service": namespace}
    errors = REGISTRY.get_sample_value("keel_rate_limit_backend_errors_total", labels)
    fallbacks = REGISTRY.get_sample_value("keel_rate_limit_fallback_checks_total", labels)
    return errors or 0.0, fallbacks or 0.0


async def test_a_hung_redis_costs_one_timeout_per_back_off_not_per_request(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    namespace = f"test-{uuid.uuid4().hex}"
    limiter = RateLimiter("1000/minute", private_redis.url, namespace, clock=clock)
    try:
        await limiter.check("k")
        private_redis.freeze()
        with caplog.at_level(logging.WARNING, logger="keel.ratelimit"):
            for _ in range(50):
                await limiter.check("k")
            assert _counts(namespace) == (1, 50)  # one Redis timeout, then straight to memory
            for _ in range(5):  # each back-off ends with one probe, which fails again
                clock.now += limiter.breaker.backoff
                await limiter.check("k")
            assert _counts(namespace) == (6, 55)
            private_redis.thaw()
            clock.now += limiter.breaker.backoff
            await limiter.check("k")  # the probe succeeds: counted in Redis again
            assert _counts(namespace) == (6, 55)
        lines = [r.getMessage() for r in caplog.records if r.name == "keel.ratelimit"]
        assert len(lines) == 2, lines  # one when the outage starts, one when it ends
        assert "Redis failing (TimeoutError" in lines[0]
        assert "answering again" in lines[1]
    finally:
        await limiter.close()


async def test_while_redis_is_down_each_process_still_limits(private_redis: PrivateRedis) -> None:
    """Failing open counts in process memory, as without Redis, rather than not limiting."""
    limiter = RateLimiter("3/minute", private_redis.url, f"test-{uuid.uuid4().hex}")
    try:
        private_redis.stop()
        for _ in range(3):
            await limiter.check("k")
        with pytest.raises(RateLimited) as refused:
            await limiter.check("k")
        assert 1 <= int(refused.value.headers["Retry-After"]) <= 60
        health = await limiter.health()
        assert health == {"backend": "redis", "status": "failing", "last_error": "ConnectionError"}
    finally:
        await limiter.close()


def test_a_flapping_redis_logs_a_line_per_ten_seconds_not_per_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    breaker, now = Breaker(backoff=1.0), 0.0
    with caplog.at_level(logging.WARNING, logger="keel.ratelimit"):
        for _ in range(100):  # 100 outages of a second each, over 200 seconds
            breaker.failed(ConnectionError("refused"), now, "test")
            now += 1.0
            assert breaker.allows(now)
            breaker.succeeded(now, "test")
            now += 1.0
    lines = [r.getMessage() for r in caplog.records if r.name == "keel.ratelimit"]
    assert len(lines) <= 2 * 200 / 10  # a start and its end at most every ten seconds
    assert "Redis failing (ConnectionError: refused)" in lines[0]
    assert "answering again after 1.0s" in lines[1]
    # The next start logged (t=12 s) counts the ones it stood in for (t=2, 4, 6, 8, 10 s).
    assert "5 more short outages since the last line" in lines[2]


async def test_a_burst_of_checks_holds_a_bounded_number_of_redis_connections(
    private_redis: PrivateRedis,
) -> None:
    """A burst of concurrent requests must not open a Redis connection each: a slow Redis would
    otherwise be pushed to its client limit by one process, failing every host's limits open."""
    namespace = f"test-{uuid.uuid4().hex}"
    # A generous budget: this is about connections, and a loaded machine must not fail it open.
    limiter = RateLimiter("100000/minute", private_redis.url, namespace, redis_timeout=5.0)
    watcher = aioredis.from_url(private_redis.url)
    try:
        await asyncio.gather(*(limiter.check(f"k{n % 7}") for n in range(150)))
        info = await watcher.info("clients")
        assert info["connected_clients"] - 1 <= REDIS_CONNECTIONS_PER_PROCESS  # 1: the watcher
        assert _counts(namespace) == (0, 0)  # every check was counted in Redis, none failed open
    finally:
        await watcher.aclose()
        await limiter.close()
