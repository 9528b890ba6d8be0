"""What every service serves besides its API: /health, /ready, /metrics, and request ids."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine, make_url

from keel.core.app import READY_CHECK_SECONDS
from keel.core.migrate import upgrade
from keel.ledger.registration import MIGRATIONS
from keel.ledger.settings import LedgerSettings
from tests import backends
from tests.support.apps import ledger_client
from tests.support.cutting_proxy import StallingProxy


@asynccontextmanager
async def _ledger(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with ledger_client(LedgerSettings(database_url=database_url, access_log=False)) as client:
        yield client


@pytest.fixture
async def empty_database_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A reachable database with no schema at all."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    url = await backends.create_postgres_database()
    try:
        yield url
    finally:
        await backends.drop_postgres_database(url)


async def test_health_reports_the_database(client: httpx.AsyncClient, backend: str) -> None:
    response = await client.get("/health", headers={"Authorization": ""})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["service"] == "ledger"
    assert body["database"] == {
        "status": "ok",
        "dialect": {"sqlite": "sqlite", "postgres": "postgresql"}[backend],
    }


async def test_ready_once_migrated(client: httpx.AsyncClient) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


async def test_not_ready_until_migrated(empty_database_url: str) -> None:
    async with _ledger(empty_database_url) as client:
        before = await client.get("/ready")
        await upgrade(empty_database_url, [MIGRATIONS])
        after = await client.get("/ready")
    assert before.status_code == 503
    assert before.headers["content-type"].startswith("application/problem+json")
    assert before.json()["code"] == "not_ready"
    assert "keel db upgrade" in before.json()["detail"]
    assert after.status_code == 200  # no restart needed


async def test_unreachable_database_is_degraded_and_not_ready() -> None:
    async with _ledger("postgresql://keel@127.0.0.1:9/nowhere") as client:
        health = await client.get("/health")
        ready = await client.get("/ready")
    assert health.status_code == 200  # liveness: the process itself is fine
    assert health.json()["status"] == "degraded"
    assert health.json()["database"]["status"] == "down"
    assert ready.status_code == 503 and ready.json()["code"] == "not_ready"


async def test_api_calls_get_503_while_the_database_is_unreachable() -> None:
    async with _ledger("postgresql://keel@127.0.0.1:9/nowhere") as client:
        posted = await client.post(
            "/transactions",
            json={"user_id": 1, "amount": 5},
            headers={"Authorization": "Bearer keel_00000000_whatever"},
        )
    assert posted.status_code == 503
    assert posted.json()["code"] == "database_unavailable"
    assert posted.headers["retry-after"] == "1"


async def test_metrics_are_prometheus_text(client: httpx.AsyncClient) -> None:
    await client.get("/health")
    await client.get("/users/999999999")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE keel_http_requests_total counter" in text
    # Labelled by route template, not raw path, so user ids cannot blow up the series count.
    assert re.search(
        r'keel_http_requests_total\{method="GET",route="/users/\{user_id\}",'
        r'service="ledger",status="404"\} [1-9]',
        text,
    ), text
    assert "/users/999999999" not in text
    assert "keel_http_request_duration_seconds_bucket" in text


async def test_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.get("/health", headers={"X-Request-ID": "trace-abc-123"})
    assert response.headers["X-Request-ID"] == "trace-abc-123"


async def test_request_id_is_made_when_missing_or_unfit(client: httpx.AsyncClient) -> None:
    missing = await client.get("/health")
    too_long = await client.get("/health", headers={"X-Request-ID": "x" * 129})
    ids = [missing.headers["X-Request-ID"], too_long.headers["X-Request-ID"]]
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in ids)
    assert ids[0] != ids[1]


async def test_error_replies_carry_the_request_id_too(client: httpx.AsyncClient) -> None:
    response = await client.get("/users/0", headers={"X-Request-ID": "bad-input-1"})
    assert response.status_code == 422
    assert response.headers["X-Request-ID"] == "bad-input-1"


async def test_openapi_and_docs_are_served(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    for path in ("/users", "/search", "/transactions", "/transfers", "/audit", "/health"):
        assert path in schema["paths"], path
    assert (await client.get("/docs")).status_code == 200


async def test_docs_load_only_local_assets(client: httpx.AsyncClient) -> None:
    """/docs and /redoc work without internet: every asset they reference is served here."""
    for page in ("/docs", "/redoc"):
        html = (await client.get(page, headers={"Authorization": ""})).text
        assets = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)["\']', html)
        assert assets, page
        for asset in assets:
            assert asset.startswith("/"), (page, asset)
            served = await client.get(asset, headers={"Authorization": ""})
            assert served.status_code == 200 and served.content, asset
        assert "https://" not in html and "http://" not in html, page


async def test_a_listing_refuses_a_query_parameter_it_does_not_declare(
    client: httpx.AsyncClient,
) -> None:
    """A typo in a filter (``q`` written ``query``) must not silently answer without it."""
    reply = await client.get("/search", params={"query": "ali", "q": "ali"})
    assert reply.status_code == 422
    assert reply.json()["errors"] == [{"loc": ["query", "query"], "msg": "Unknown query parameter"}]
    assert (await client.get("/search", params={"q": "ali"})).status_code == 200


async def test_a_listing_refuses_a_single_valued_parameter_given_twice(
    client: httpx.AsyncClient,
) -> None:
    """``?limit=5&limit=500`` must not quietly take one of them: which one is the client's guess."""
    reply = await client.get("/search", params=[("q", "ali"), ("limit", "5"), ("limit", "500")])
    assert reply.status_code == 422
    assert reply.json()["errors"] == [
        {"loc": ["query", "limit"], "msg": "Query parameter given more than once"}
    ]
    assert (await client.get("/search", params=[("q", "ali"), ("limit", "5")])).status_code == 200


async def test_a_burst_of_readiness_probes_checks_the_database_once(
    client: httpx.AsyncClient,
) -> None:
    """1,000 load-balancer probes at once once answered 503 on PostgreSQL: each queued its own
    migration check on the pool. Probes that arrive while a check runs share its answer."""
    checks = 0

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal checks
        checks += "alembic_version" in statement

    sa_event.listen(Engine, "before_cursor_execute", count)
    try:
        replies = await asyncio.gather(*(client.get("/ready") for _ in range(300)))
    finally:
        sa_event.remove(Engine, "before_cursor_execute", count)
    assert [r.status_code for r in replies] == [200] * 300
    assert 0 < checks <= 4 * 5, checks  # a few checks (one per chain each), not 300


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_readiness_check_that_hangs_does_not_hold_every_later_probe(
    database_url: str,
) -> None:
    """Probes share the migration check in flight. One that never returns (the database went
    silent behind a dropped link: no error, no answer) must not be shared for ever: once the
    database is reachable again, a later probe must answer, and say ready."""
    url = make_url(database_url)
    proxy = await StallingProxy(url.host or "127.0.0.1", url.port or 5432).start()
    through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    async with _ledger(through) as client:
        try:
            assert (await client.get("/ready")).status_code == 200
            proxy.stall()
            hung = asyncio.create_task(client.get("/ready"))
            deadline = time.monotonic() + 10
            while not proxy.swallowed:  # the check has sent its query into the silence
                assert time.monotonic() < deadline, "the probe never reached the database"
                await asyncio.sleep(0.01)
            proxy.heal()
            deadline = time.monotonic() + 60  # pooled connections stalled too may go first
            while True:
                async with asyncio.timeout(READY_CHECK_SECONDS + 5):  # never answered: fails
                    reply = await client.get("/ready")
                if reply.status_code == 200:
                    break
                assert reply.json()["code"] == "not_ready"
                assert time.monotonic() < deadline, reply.json()
                await asyncio.sleep(0.1)
            hung.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hung
        finally:
            await proxy.close()
