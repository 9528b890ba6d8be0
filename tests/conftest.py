"""Fixtures: every database test runs on SQLite and on PostgreSQL through the same code."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from keel.core.auth import Scope, create_api_key
from keel.core.database import Database, create_engine
from keel.ledger.app import create_app
from keel.ledger.settings import LedgerSettings
from keel.registry import services
from tests import backends

_AVAILABILITY: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    _AVAILABILITY.update(backends.availability())


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    for name, why_not in _AVAILABILITY.items():
        state = "available" if why_not is None else f"UNAVAILABLE, its tests skip: {why_not}"
        lines.append(f"keel backends: {name} {state}")
    return lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    missing = {k: v for k, v in _AVAILABILITY.items() if v}
    if missing:
        terminalreporter.section("keel: skipped backends")
        for name, why in missing.items():
            terminalreporter.write_line(f"{name}: {why}")


# Every registered service's tables: the shared databases serve every service's tests.
ALL_CHAINS = [entry.migrations for entry in services().values()]


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "postgres":
        backends.require("postgres", _AVAILABILITY.get("postgres"))
    return name


@pytest.fixture(scope="session")
def redis_url() -> str:
    backends.require("redis", _AVAILABILITY.get("redis"))
    return backends.REDIS_URL


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One migrated PostgreSQL database for the session; tests own their rows in it."""
    backends.require("postgres", _AVAILABILITY.get("postgres"))
    yield from backends.migrated_postgres_database(ALL_CHAINS)


@pytest.fixture
def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Every service's tables: a fresh SQLite file, or the session's PostgreSQL database."""
    if backend == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return backends.migrated_sqlite_url(tmp_path, ALL_CHAINS)


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = Database(create_engine(database_url))
    yield db
    await db.dispose()


@pytest.fixture
def make_key(database: Database) -> Any:
    async def make(scope: Scope = Scope.ADMIN) -> str:
        async with database.write() as conn:
            return await create_api_key(conn, scope=scope, name="test")

    return make


@pytest.fixture
def ledger_settings(database_url: str) -> LedgerSettings:
    return LedgerSettings(database_url=database_url, rate_limit="100000/second", access_log=False)


@pytest.fixture
async def ledger_app(ledger_settings: LedgerSettings) -> AsyncIterator[Any]:
    app = create_app(ledger_settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def admin_key(make_key: Any) -> str:
    key: str = await make_key(Scope.ADMIN)
    return key


@pytest.fixture
async def client(ledger_app: Any, admin_key: str) -> AsyncIterator[httpx.AsyncClient]:
    """An admin-keyed client talking to the ledger in-process."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=ledger_app),
        base_url="http://ledger.test",
        headers={"Authorization": f"Bearer {admin_key}"},
    ) as c:
        yield c


@pytest.fixture
def anyio_backend() -> Iterator[str]:
    yield "asyncio"
