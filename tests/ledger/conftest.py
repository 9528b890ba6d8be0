"""Ledger fixtures: real multi-process servers on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from keel.core.database import Database, create_engine
from keel.core.migrate import upgrade
from keel.ledger.registration import MIGRATIONS
from tests.support.ledger import create_key
from tests.support.live_server import LiveServer

CLUSTER_WORKERS = 4


@dataclass
class Cluster:
    """A running multi-worker ledger, its database and an admin key valid on it."""

    server: LiveServer
    database_url: str
    admin_key: str

    def client(self, connections: int = 100, key: str | None = None) -> httpx.AsyncClient:
        """A client that opens up to ``connections`` connections at once."""
        return httpx.AsyncClient(
            base_url=self.server.base_url,
            headers={"Authorization": f"Bearer {key or self.admin_key}"},
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            timeout=httpx.Timeout(60.0),
        )


@pytest.fixture(scope="session")
def ledger_cluster(
    backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    """One 4-worker ledger server per backend, shared by tests that each own their accounts.

    Starting four worker processes costs seconds on a small machine, so tests that only add their
    own users and check those share this one; tests that crash a server start their own.
    """
    workdir = tmp_path_factory.mktemp(f"cluster-{backend}")
    if backend == "postgres":
        url: str = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{workdir / 'ledger.db'}"
        asyncio.run(upgrade(url, [MIGRATIONS]))
    admin_key = asyncio.run(create_key(url))
    server = LiveServer(url, workdir, workers=CLUSTER_WORKERS)
    with server:
        yield Cluster(server, url, admin_key)


@pytest.fixture
async def cluster_db(ledger_cluster: Cluster) -> AsyncIterator[Database]:
    """The shared cluster's database, for checking what the server wrote."""
    database = Database(create_engine(ledger_cluster.database_url))
    yield database
    await database.dispose()


@pytest.fixture
def ledger_server(database_url: str, tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start ledger servers of this test's own on its database; all are stopped afterwards."""
    servers: list[LiveServer] = []

    def start(workers: int = 2) -> LiveServer:
        workdir = tmp_path / f"server-{len(servers)}"
        workdir.mkdir()
        server = LiveServer(database_url, workdir, workers=workers)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
