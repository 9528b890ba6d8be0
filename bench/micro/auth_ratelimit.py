"""Micro-benchmark: µs per rate-limit check and per authentication of a cached key.

Run with ``uv run python bench/micro/auth_ratelimit.py``. Every check yields to the event loop
once, as a request does, so work a limiter schedules on the loop is paid inside the timing; the
cost of that bare yield is measured alongside and subtracted. Time is the process's CPU time (so
other processes' load does not count, while threads a limiter starts do); variants alternate
round by round and medians are reported, because this machine's speed drifts.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from limits import parse_many
from limits.aio.storage import MemoryStorage as AsyncMemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter as AsyncSlidingWindow
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter, SlidingWindowCounterRateLimiter
from starlette.datastructures import Headers

from keel.core.auth import ApiKeyVerifier, Scope, create_api_key
from keel.core.database import Database, create_engine
from keel.core.migrate import upgrade
from keel.core.ratelimit import RateLimiter

SPEC = "1000000000/second"
ROUNDS, CHECKS = 7, 20_000
Check = Callable[[], Awaitable[object]]


def limits_async_sliding_window() -> Check:
    """The limiter keel used before: limits' asyncio sliding window counter in memory."""
    limiter, items = AsyncSlidingWindow(AsyncMemoryStorage()), parse_many(SPEC)

    async def check() -> None:
        for item in items:
            assert await limiter.hit(item, "42")

    return check


def limits_sync(strategy: type[FixedWindowRateLimiter | SlidingWindowCounterRateLimiter]) -> Check:
    """limits' synchronous strategies on its synchronous memory storage (no awaits inside)."""
    limiter, items = strategy(MemoryStorage()), parse_many(SPEC)

    async def check() -> None:
        for item in items:
            assert limiter.hit(item, "42")

    return check


def keel_limiter() -> Check:
    limiter = RateLimiter(SPEC, None, "bench")
    return lambda: limiter.check("42")


async def keel_verifier(directory: Path) -> Check:
    """Authentication of a key already in the verifier's cache (the steady state)."""
    url = f"sqlite:///{directory / 'bench.db'}"
    await upgrade(url, "ledger")
    database = Database(create_engine(url))
    async with database.write() as conn:
        raw = await create_api_key(conn, scope=Scope.ADMIN, name="bench")
    verifier = ApiKeyVerifier(database, 3600.0)
    headers = Headers({"authorization": f"Bearer {raw}"})
    await verifier.authenticate(headers, Scope.READ)
    return lambda: verifier.authenticate(headers, Scope.READ)


async def bare_yield() -> None:
    return None


async def microseconds_per_check(check: Check) -> float:
    started = time.process_time()
    for _ in range(CHECKS):
        await check()
        await asyncio.sleep(0)
    return (time.process_time() - started) / CHECKS * 1e6


async def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        variants: dict[str, Check] = {
            "bare yield (subtracted)": bare_yield,
            "limits aio sliding window + memory": limits_async_sliding_window(),
            "limits sync sliding window + memory": limits_sync(SlidingWindowCounterRateLimiter),
            "limits sync fixed window + memory": limits_sync(FixedWindowRateLimiter),
            "keel RateLimiter (memory)": keel_limiter(),
            "keel ApiKeyVerifier, cached key": await keel_verifier(Path(directory)),
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(ROUNDS):
            for name, check in variants.items():
                samples[name].append(await microseconds_per_check(check))
    base = statistics.median(samples["bare yield (subtracted)"])
    print(f"python {sys.version.split()[0]}; {ROUNDS} rounds x {CHECKS} checks; median µs/check")
    for name, values in samples.items():
        net = statistics.median(values) - (0 if name.startswith("bare") else base)
        print(f"  {name:40s} {net:6.2f}   (rounds {min(values):.2f}..{max(values):.2f} gross)")


if __name__ == "__main__":
    asyncio.run(main())
