"""Helpers for the Redis buffer's tests: unique streams, settings, waiting on Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from keel.core.uuid7 import uuid7
from keel.firehose.settings import FirehoseSettings

NOW = time.time()


def unique_stream() -> str:
    return f"keel:test:{uuid.uuid4().hex[:12]}"


def redis_settings(database_url: str, redis_url: str, stream: str, **over: Any) -> FirehoseSettings:
    """A Redis-buffered firehose on its own stream, with quick writers and a short claim time."""
    fields: dict[str, Any] = {
        "database_url": database_url,
        "rate_limit": "100000/second",
        "access_log": False,
        "buffer": "redis",
        "redis_url": redis_url,
        "redis_stream": stream,
        "redis_group": "writers",
        "flush_age_ms": 20,
        "claim_idle_seconds": 0.5,
        "redis_timeout_seconds": 1.0,
        **over,
    }
    return FirehoseSettings(**fields)


def events_with_ids(count: int) -> list[dict[str, object]]:
    return [
        {"user_id": f"u{i % 7}", "name": "view", "timestamp": NOW, "event_id": str(uuid7())}
        for i in range(count)
    ]


async def eventually(
    condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def stream_state(
    client: aioredis.Redis, stream: str, group: str = "writers"
) -> dict[str, int]:
    """What Redis still holds of the buffer: entries, the depth counter, pending entries."""
    length = await client.xlen(stream)
    depth = int(await client.get(f"{stream}:depth") or 0)
    pending = 0
    if await client.exists(stream):
        pending = int((await client.xpending(stream, group))["pending"])
    return {"entries": length, "depth": depth, "pending": pending}


async def drop_stream(redis_url: str, stream: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        await client.delete(stream, f"{stream}:depth")
    finally:
        await client.aclose()
