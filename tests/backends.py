"""Which databases the suite runs on, and fresh databases on them.

SQLite always. PostgreSQL and Redis when ``KEEL_TEST_POSTGRES_URL`` / ``KEEL_TEST_REDIS_URL`` point
at a reachable server (they default to the local ones). With ``KEEL_TEST_REQUIRE_SERVICES=1``
(CI) an unreachable server fails the run instead of skipping.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from sqlalchemy.engine import make_url

from keel.core.chains import MigrationChain
from keel.core.migrate import upgrade

POSTGRES_URL = os.environ.get("KEEL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("KEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRED = os.environ.get("KEEL_TEST_REQUIRE_SERVICES") == "1"


def _plain_pg(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _postgres_reachable() -> str | None:
    try:
        conn = await asyncpg.connect(_plain_pg(POSTGRES_URL), timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"PostgreSQL not reachable at {POSTGRES_URL}: {exc!r}"
    await conn.close()
    return None


async def _redis_reachable() -> str | None:
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (OSError, aioredis.RedisError) as exc:
        return f"Redis not reachable at {REDIS_URL}: {exc!r}"
    finally:
        await client.aclose()
    return None


def availability() -> dict[str, str | None]:
    """backend -> None if usable, else why not."""
    return {
        "postgres": asyncio.run(_postgres_reachable()),
        "redis": asyncio.run(_redis_reachable()),
    }


def require(backend: str, why_not: str | None) -> None:
    if why_not is None:
        return
    if REQUIRED:
        pytest.fail(f"{why_not} (KEEL_TEST_REQUIRE_SERVICES=1: a skip here is a failure)")
    pytest.skip(why_not)


async def create_postgres_database() -> str:
    """A new empty database on the test server; returns its URL."""
    name = f"keel_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_plain_pg(POSTGRES_URL))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return (
        make_url(_plain_pg(POSTGRES_URL)).set(database=name).render_as_string(hide_password=False)
    )


async def drop_postgres_database(url: str) -> None:
    name = make_url(url).database
    conn = await asyncpg.connect(_plain_pg(POSTGRES_URL))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def migrated_postgres_database(chains: Sequence[MigrationChain]) -> Iterator[str]:
    """A fresh PostgreSQL database with the core's and ``chains``' schema, dropped afterwards
    (a fixture body)."""
    url = asyncio.run(create_postgres_database())
    asyncio.run(upgrade(url, chains))
    yield url
    asyncio.run(drop_postgres_database(url))


def migrated_sqlite_url(directory: Path, chains: Sequence[MigrationChain]) -> str:
    """A fresh SQLite file in ``directory`` with the core's and ``chains``' schema."""
    url = f"sqlite:///{directory / (chains[-1].name if chains else 'core')}.db"
    asyncio.run(upgrade(url, chains))
    return url
