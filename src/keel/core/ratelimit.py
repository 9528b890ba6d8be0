"""Per-API-key rate limits: in process memory, or shared through Redis, failing open.

Without ``KEEL_REDIS_URL`` each worker process counts on its own (so N workers allow N times the
limit). With it the counters live in Redis, through the ``limits`` library's atomic scripts, and
hold across processes and hosts.

Redis helps enforce a limit; it must not take the service down. A Redis call waits at most
``rate_limit_redis_timeout_seconds``; after a failure the limiter stops asking Redis for
``rate_limit_redis_backoff_seconds`` (then one request probes it again) and meanwhile counts in
process memory, as it would without Redis, rather than not limiting at all. An outage is logged
when it starts and ends (see :class:`Breaker`), counted in ``/metrics`` and shown on ``/health``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from prometheus_client import Counter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from keel.core.errors import RateLimited

log = logging.getLogger("keel.ratelimit")

BACKEND_ERRORS = Counter(
    "keel_rate_limit_backend_errors_total",
    "Rate-limiter calls to Redis that failed or timed out (requests were counted in memory).",
    ["service"],
)
LOCAL_FALLBACKS = Counter(
    "keel_rate_limit_fallback_checks_total",
    "Rate-limit checks counted in process memory because Redis was unavailable.",
    ["service"],
)
_LOG_EVERY_SECONDS = 60.0  # while an outage lasts
_LOG_GAP_SECONDS = 10.0  # between the starts of outages


class LocalLimit:
    """``amount`` requests per ``window`` seconds per identity, counted in this process.

    The sliding-window-counter approximation the ``limits`` library uses for Redis: the previous
    fixed window's count, weighted by how much of it the sliding window still covers, plus the
    current window's count. A plain dict of three numbers per identity: the library's in-memory
    storages build string keys, take locks and schedule expiry work on every hit, which made the
    check several times dearer than the rest of authentication.
    """

    __slots__ = ("_counts", "_swept", "amount", "window")

    def __init__(self, amount: int, window: float) -> None:
        self.amount = amount
        self.window = window
        self._counts: dict[str, tuple[int, int, int]] = {}  # identity -> (window, prev, current)
        self._swept = 0

    def hit(self, identity: str, now: float) -> float | None:
        """Count one request; None if allowed, else the seconds until one would be."""
        index = int(now // self.window)
        previous, current = self._previous_and_current(identity, index)
        elapsed = now - index * self.window
        weight = 1.0 - elapsed / self.window
        if previous * weight + current >= self.amount:
            return self._wait(previous, current, elapsed)
        self._counts[identity] = (index, previous, current + 1)
        if index > self._swept + 1:
            self._sweep(index)
        return None

    def _previous_and_current(self, identity: str, index: int) -> tuple[int, int]:
        entry = self._counts.get(identity)
        if entry is None or entry[0] < index - 1:
            return 0, 0
        if entry[0] == index - 1:
            return entry[2], 0
        return entry[1], entry[2]

    def _wait(self, previous: int, current: int, elapsed: float) -> float:
        """Seconds until ``previous * weight + current`` drops below ``amount``."""
        if current < self.amount:  # the previous window's share decays within this one
            return self.window * (1.0 - (self.amount - current) / previous) - elapsed
        # only once this window is the previous one, and its share has decayed far enough
        return self.window - elapsed + self.window * (1.0 - self.amount / max(current, 1))

    def _sweep(self, index: int) -> None:
        """Forget identities idle for two windows, so the dict holds only recent callers."""
        self._counts = {k: v for k, v in self._counts.items() if v[0] >= index - 1}
        self._swept = index


# A burst of requests shares these; past them a check waits (within its time budget) for one.
REDIS_CONNECTIONS_PER_PROCESS = 32


class RedisBackend:
    """limits' counters in Redis, with short timeouts and no retries (the caller fails open)."""

    def __init__(self, url: str, namespace: str, timeout: float) -> None:
        self.timeout = timeout
        # Bounded: a slow Redis must not collect a connection per request in flight, up to its
        # client limit, which would fail every host's limits open.
        self._pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS_PER_PROCESS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._client = aioredis.Redis(connection_pool=self._pool)
        # limits types its options as scalars, but hands connection_pool to redis-py as is
        pool: dict[str, Any] = {"connection_pool": self._pool}
        storage = RedisStorage(
            url, implementation="redispy", key_prefix=f"keel:{namespace}", **pool
        )
        self._limiter = SlidingWindowCounterRateLimiter(storage)

    async def hit(self, item: RateLimitItem, identity: str) -> float | None:
        """Count one request in Redis; None if allowed, else the seconds until one would be."""
        async with asyncio.timeout(self.timeout):
            if await self._limiter.hit(item, identity):
                return None
            stats = await self._limiter.get_window_stats(item, identity)
        return stats.reset_time - time.time()

    async def ping(self) -> None:
        async with asyncio.timeout(self.timeout):
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()
        await self._pool.aclose()


class Breaker:
    """Whether to ask Redis now: not again for ``backoff`` seconds after it failed.

    Logs when an outage starts and ends, and once a minute while it lasts. A Redis that flaps
    (each probe succeeding, the next call failing) gets at most one start line per
    ``_LOG_GAP_SECONDS``, each counting the outages it stands for, never a line per request.
    """

    def __init__(self, backoff: float) -> None:
        self.backoff = backoff
        self.failing = False
        self.last_error: str | None = None
        self._retry_at = 0.0
        self._since = 0.0
        self._errors = 0
        self._outages = 0  # started since the last line logged
        self._logged_at = -math.inf
        self._outage_logged = False

    def allows(self, now: float) -> bool:
        if not self.failing:
            return True
        if now < self._retry_at:
            return False
        self._retry_at = now + self.backoff  # this request probes; the others keep counting locally
        return True

    def failed(self, exc: BaseException, now: float, namespace: str) -> None:
        self.last_error = type(exc).__name__
        self._retry_at = now + self.backoff
        if not self.failing:
            self.failing, self._since, self._errors = True, now, 0
            self._outages += 1
            if now - self._logged_at >= _LOG_GAP_SECONDS:
                self._log(
                    now,
                    "%s: rate-limit Redis failing (%s%s); counting in this process,"
                    " asking Redis again every %.1fs",
                    namespace,
                    self._describe(exc),
                    self._flaps(),
                    self.backoff,
                )
        self._errors += 1
        if now - self._logged_at >= _LOG_EVERY_SECONDS:
            self._log(
                now,
                "%s: rate-limit Redis still failing after %.0fs (%d errors, last %s)",
                namespace,
                now - self._since,
                self._errors,
                self._describe(exc),
            )

    def succeeded(self, now: float, namespace: str) -> None:
        if not self.failing:
            return
        self.failing = False
        if self._outage_logged:  # an end is logged only if the outage was
            self._log(
                now,
                "%s: rate-limit Redis answering again after %.1fs (%d errors)",
                namespace,
                now - self._since,
                self._errors,
            )

    def _log(self, now: float, message: str, *args: object) -> None:
        self._logged_at, self._outages, self._outage_logged = now, 0, self.failing
        log.warning(message, *args)

    def _flaps(self) -> str:
        earlier = self._outages - 1
        return f"; {earlier} more short outages since the last line" if earlier else ""

    def _describe(self, exc: BaseException) -> str:
        return f"{self.last_error}: {exc}" if str(exc) else str(self.last_error)


class RateLimiter:
    """Enforces ``KEEL_RATE_LIMIT`` (e.g. ``"2000/second;60000/minute"``) per key."""

    def __init__(
        self,
        spec: str,
        redis_url: str | None,
        namespace: str,
        *,
        redis_timeout: float = 0.05,
        redis_backoff: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.items = parse_many(spec)
        self._clock = clock
        self.namespace = namespace
        self._local = [LocalLimit(item.amount, item.get_expiry()) for item in self.items]
        self._redis = RedisBackend(redis_url, namespace, redis_timeout) if redis_url else None
        self.breaker = Breaker(redis_backoff)
        self._errors = BACKEND_ERRORS.labels(namespace)
        self._fallbacks = LOCAL_FALLBACKS.labels(namespace)

    async def check(self, identity: str) -> None:
        """Count one request for ``identity``; raise 429 with Retry-After once over a limit."""
        now = self._clock()
        if self._redis is not None:
            if self.breaker.allows(now) and await self._check_redis(self._redis, identity):
                return
            self._fallbacks.inc()
            now = self._clock()
        for item, limit in zip(self.items, self._local, strict=True):
            wait = limit.hit(identity, now)
            if wait is not None:
                raise _refusal(item, wait)

    async def _check_redis(self, redis: RedisBackend, identity: str) -> bool:
        """Count in Redis; False if Redis could not answer (the caller counts locally)."""
        for item in self.items:
            try:
                wait = await redis.hit(item, identity)
            except Exception as exc:  # any backend failure fails open, logged and counted
                self._failed(exc)
                return False
            if wait is not None:
                self.breaker.succeeded(self._clock(), self.namespace)
                raise _refusal(item, wait)
        self.breaker.succeeded(self._clock(), self.namespace)
        return True

    def _failed(self, exc: Exception) -> None:
        self._errors.inc()
        self.breaker.failed(exc, self._clock(), self.namespace)

    async def health(self) -> dict[str, Any]:
        """The ``rate_limit`` part of ``/health``; pings Redis unless it is backing off."""
        if self._redis is None:
            return {"backend": "memory", "status": "ok"}
        now = self._clock()
        if self.breaker.allows(now):
            try:
                await self._redis.ping()
            except Exception as exc:
                self._failed(exc)
            else:
                self.breaker.succeeded(now, self.namespace)
        return {
            "backend": "redis",
            "status": "failing" if self.breaker.failing else "ok",
            "last_error": self.breaker.last_error,
        }

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.close()


def _refusal(item: RateLimitItem, wait: float) -> RateLimited:
    return RateLimited(
        f"More than {item} requests for this API key.",
        headers={"Retry-After": str(max(1, math.ceil(wait)))},
    )
