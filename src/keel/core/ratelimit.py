"""Per-API-key rate limits, through the ``limits`` library.

With ``KEEL_REDIS_URL`` set the counters live in Redis and hold across processes and hosts;
without it each worker process counts on its own (so N workers allow N times the limit).
"""

from __future__ import annotations

import math
import time

from limits import parse_many
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from keel.core.errors import RateLimited


class RateLimiter:
    """Enforces ``KEEL_RATE_LIMIT`` (e.g. ``"2000/second;60000/minute"``) per key."""

    def __init__(self, spec: str, redis_url: str | None, namespace: str) -> None:
        self.items = parse_many(spec)
        self.storage: Storage = (
            RedisStorage(redis_url, implementation="redispy", key_prefix=f"keel:{namespace}")
            if redis_url
            else MemoryStorage()
        )
        self._limiter = SlidingWindowCounterRateLimiter(self.storage)

    async def check(self, identity: str) -> None:
        """Count one request for ``identity``; raise 429 with Retry-After once over a limit."""
        for item in self.items:
            if not await self._limiter.hit(item, identity):
                stats = await self._limiter.get_window_stats(item, identity)
                retry_after = max(1, math.ceil(stats.reset_time - time.time()))
                raise RateLimited(
                    f"More than {item} requests for this API key.",
                    headers={"Retry-After": str(retry_after)},
                )
