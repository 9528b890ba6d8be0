"""The group committer under faults: deadlocks, a dying task, a full queue, a stalled commit."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.util import await_only

from keel.core.batching import GroupCommitter
from keel.core.database import Database
from keel.core.errors import (
    DatabaseUnavailable,
    OutcomeUnknown,
    Overloaded,
    ServiceUnavailable,
    render_exception,
)
from keel.ledger.app import create_app
from keel.ledger.settings import LedgerSettings
from tests.ledger.helpers import new_user
from tests.support.ledger import accounts

Apply = Callable[[Connection, list[int]], list[int]]


@pytest.fixture
async def table(database: Database) -> AsyncIterator[str]:
    name = f"scratch_{uuid.uuid4().hex[:10]}"
    async with database.write() as conn:
        await conn.execute(text(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, v INTEGER)"))
    yield name
    async with database.write() as conn:
        await conn.execute(text(f"DROP TABLE {name}"))


def inserting(table: str) -> Apply:
    def apply(conn: Connection, items: list[int]) -> list[int]:
        for item in items:
            conn.execute(text(f"INSERT INTO {table} (id, v) VALUES (:id, 0)"), {"id": item})
        return items

    return apply


async def stored(database: Database, table: str) -> list[int]:
    async with database.read() as conn:
        return list((await conn.execute(text(f"SELECT id FROM {table} ORDER BY id"))).scalars())


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_full_queue_refuses_with_overloaded_and_writes_nothing(
    database: Database, table: str
) -> None:
    committer: GroupCommitter[int, int] = GroupCommitter(
        name="test_full", database=database, apply=inserting(table), max_queue=2
    )
    # Not started yet, so whatever is submitted stays queued.
    queued = [asyncio.create_task(committer.submit(i)) for i in (1, 2)]
    await wait_for(lambda: committer.queue_depth == 2)
    with pytest.raises(Overloaded) as refused:
        await committer.submit(3)
    response = render_exception(refused.value)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert b'"code":"overloaded"' in response.body
    committer.start()
    try:
        assert await asyncio.gather(*queued) == [1, 2]
    finally:
        await committer.stop()
    assert await stored(database, table) == [1, 2]


async def test_a_batch_stops_at_its_weight(database: Database, table: str) -> None:
    """Items weighing 4 with max_weight 10: at most two per transaction (one alone if heavier)."""
    sizes: list[int] = []
    insert = inserting(table)

    def apply(conn: Connection, items: list[int]) -> list[int]:
        sizes.append(len(items))
        return insert(conn, items)

    committer: GroupCommitter[int, int] = GroupCommitter(
        name="test_weight", database=database, apply=apply, weigh=lambda _: 4, max_weight=10
    )
    queued = [asyncio.create_task(committer.submit(i)) for i in range(1, 8)]
    await wait_for(lambda: committer.queue_depth == 7)  # all queued before the first batch
    committer.start()
    try:
        assert await asyncio.gather(*queued) == list(range(1, 8))
    finally:
        await committer.stop()
    assert sizes == [2, 2, 2, 1]
    assert await stored(database, table) == list(range(1, 8))


class Died(BaseException):
    """Escapes the committer's per-batch error handling, as a bug in it would."""


async def test_a_dead_committer_fails_fast_then_restarts(database: Database, table: str) -> None:
    insert = inserting(table)
    deaths = []

    def apply(conn: Connection, items: list[int]) -> list[int]:
        if 666 in items:
            deaths.append(items)
            raise Died()
        return insert(conn, items)

    committer: GroupCommitter[int, int] = GroupCommitter(
        name="test_dead", database=database, apply=apply
    )
    committer.RESTART_DELAYS = (0.5,)
    committer.start()
    try:
        assert await committer.submit(1) == 1
        with pytest.raises(OutcomeUnknown):  # died mid-batch: committed or not, nobody knows
            await asyncio.wait_for(committer.submit(666), 5)
        reason = committer.unready()
        assert reason is not None and "committer died (Died)" in reason
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable) as paused:
            await committer.submit(2)
        assert time.monotonic() - started < 0.1  # fails at once rather than waiting
        assert paused.value.headers["Retry-After"] == "1"
        await wait_for(lambda: committer.unready() is None)
        assert await committer.submit(3) == 3  # restarted by itself
    finally:
        await committer.stop()
    assert await stored(database, table) == [1, 3]


async def test_ready_is_503_while_the_ledger_committer_is_down(
    ledger_settings: LedgerSettings, make_key: Any
) -> None:
    app = create_app(ledger_settings)
    async with app.router.lifespan_context(app):
        key = await make_key()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://ledger.test",
            headers={"Authorization": f"Bearer {key}"},
        ) as client:
            user = await new_user(client)
            postings: GroupCommitter[Any, Any] = app.state.platform.services["postings"]
            postings.RESTART_DELAYS = (60.0,)

            def die(conn: Connection, batch: list[Any]) -> list[Any]:
                raise Died()

            postings._apply = die  # a fault injected into the running service
            body = {"user_id": user["id"], "amount": 5}
            lost = await client.post("/transactions", json=body)
            assert lost.status_code == 502 and lost.json()["code"] == "outcome_unknown"
            assert "retry-after" not in lost.headers
            ready = await client.get("/ready")
            assert ready.status_code == 503 and ready.json()["code"] == "not_ready"
            assert "ledger_postings: committer died" in ready.json()["detail"]
            refused = await client.post("/transactions", json=body)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"


# SQLite runs a batch without yielding to the loop, so these need PostgreSQL.
postgres_only = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


@postgres_only
async def test_submit_waits_no_longer_than_its_timeout(database: Database, table: str) -> None:
    insert = inserting(table)

    def slow(conn: Connection, items: list[int]) -> list[int]:
        conn.execute(text("SELECT pg_sleep(3)"))  # a commit that hangs, as on a dead network
        return insert(conn, items)

    committer: GroupCommitter[int, int] = GroupCommitter(
        name="test_slow", database=database, apply=slow, timeout=0.5, max_batch=1
    )
    committer.start()
    try:
        started = time.monotonic()
        first = asyncio.create_task(committer.submit(1))
        await wait_for(lambda: committer.in_flight == 1)
        second = asyncio.create_task(committer.submit(2))
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert time.monotonic() - started < 2.5
        assert isinstance(results[0], OutcomeUnknown)  # in flight: it may still commit
        assert isinstance(results[1], DatabaseUnavailable)  # still queued: dropped
        assert committer.unready() is not None  # the stalled commit shows on /ready
    finally:
        await committer.stop()
    assert await stored(database, table) == [1]  # the stalled one did commit after all


@postgres_only
async def test_deadlocked_batch_runs_again(database: Database, table: str) -> None:
    """Two committers (as two processes) lock two rows in crossed order: a real 40P01."""
    async with database.write() as conn:
        await conn.execute(text(f"INSERT INTO {table} (id, v) VALUES (1, 0), (2, 0)"))
    locked = {1: asyncio.Event(), 2: asyncio.Event()}
    calls: list[int] = []

    def crossing(first: int, second: int) -> Apply:
        def apply(conn: Connection, items: list[int]) -> list[int]:
            calls.append(first)
            bump = text(f"UPDATE {table} SET v = v + 1 WHERE id = :id")
            conn.execute(bump, {"id": first})
            locked[first].set()
            await_only(locked[second].wait())  # both hold one row before either asks for more
            conn.execute(bump, {"id": second})
            return items

        return apply

    one: GroupCommitter[int, int] = GroupCommitter(
        name="test_deadlock_a", database=database, apply=crossing(1, 2)
    )
    two: GroupCommitter[int, int] = GroupCommitter(
        name="test_deadlock_b", database=database, apply=crossing(2, 1)
    )
    one.start()
    two.start()
    try:
        assert await asyncio.gather(one.submit(10), two.submit(20)) == [10, 20]
    finally:
        await one.stop()
        await two.stop()
    async with database.read() as conn:
        rows = (await conn.execute(text(f"SELECT id, v FROM {table} ORDER BY id"))).all()
    assert [tuple(r) for r in rows] == [(1, 2), (2, 2)]  # both batches applied, once each
    assert len(calls) == 3  # one of them was rolled back and ran again


async def test_overloaded_over_http_writes_nothing(
    database_url: str, database: Database, make_key: Any
) -> None:
    """With the write lock held elsewhere, postings queue up to the bound; the rest are refused."""
    settings = LedgerSettings(
        database_url=database_url, rate_limit="100000/second", access_log=False, write_queue_max=2
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        key = await make_key()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://ledger.test",
            headers={"Authorization": f"Bearer {key}"},
        ) as client:
            user = await new_user(client)
            postings: GroupCommitter[Any, Any] = app.state.platform.services["postings"]
            body = {"user_id": user["id"], "amount": 1}
            release = asyncio.Event()

            async def hold_write_lock() -> None:
                async with database.write() as conn:
                    await conn.execute(
                        text("UPDATE ledger_users SET balance = balance WHERE id = :id"),
                        {"id": user["id"]},
                    )
                    await release.wait()

            holder = asyncio.create_task(hold_write_lock())
            await asyncio.sleep(0)
            first = asyncio.create_task(client.post("/transactions", json=body))
            await wait_for(lambda: postings.in_flight == 1)
            rest = [asyncio.create_task(client.post("/transactions", json=body)) for _ in range(6)]
            await wait_for(lambda: sum(t.done() for t in rest) == 4)
            release.set()
            await holder
            replies = await asyncio.gather(first, *rest)
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [201, 201, 201, 503, 503, 503, 503]
    for reply in replies:
        if reply.status_code == 503:
            assert reply.json()["code"] == "overloaded" and reply.headers["retry-after"] == "1"
    stored_entries = (await accounts(database, [user["id"]]))[user["id"]].entries
    assert len(stored_entries) == 3


class Unreachable(ServiceUnavailable):
    code = "unreachable"


async def test_an_async_commit_takes_concurrent_items_in_one_call() -> None:
    """commit= instead of database + apply: one call per batch, each item answered on its own."""
    calls: list[list[int]] = []
    release = asyncio.Event()

    async def commit(items: list[int]) -> list[object]:
        calls.append(items)
        if len(calls) == 1:
            await release.wait()  # hold the first batch so the rest queue behind it
        return [ValueError(f"refused {i}") if i < 0 else i * 10 for i in items]

    committer: GroupCommitter[int, int] = GroupCommitter(
        name="test_async", commit=commit, max_queue=100, timeout=5.0
    )
    committer.start()
    try:
        first = asyncio.create_task(committer.submit(1))
        await wait_for(lambda: committer.in_flight == 1)
        rest = [asyncio.create_task(committer.submit(i)) for i in (2, -3, 4)]
        await wait_for(lambda: committer.queue_depth == 3)
        release.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
    finally:
        await committer.stop()
    assert calls == [[1], [2, -3, 4]]
    assert results[0] == 10 and results[1] == 20 and results[3] == 40
    assert isinstance(results[2], ValueError) and str(results[2]) == "refused -3"


async def test_an_async_commit_is_bounded_by_its_timeout() -> None:
    """A stalled commit: in flight is outcome_unknown, queued is the committer's own 503."""
    stalled = asyncio.Event()

    async def commit(items: list[int]) -> list[int]:
        await stalled.wait()
        return items

    committer: GroupCommitter[int, int] = GroupCommitter(
        name="test_async_slow",
        commit=commit,
        max_queue=100,
        timeout=0.3,
        max_batch=1,
        unavailable=Unreachable,
    )
    committer.start()
    try:
        first = asyncio.create_task(committer.submit(1))
        await wait_for(lambda: committer.in_flight == 1)
        second = asyncio.create_task(committer.submit(2))
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert isinstance(results[0], OutcomeUnknown)
        assert isinstance(results[1], Unreachable)
        assert committer.unready() is not None
    finally:
        stalled.set()
        await committer.stop()


def test_a_committer_needs_a_database_or_a_commit() -> None:
    async def commit(items: list[int]) -> list[int]:
        return items

    with pytest.raises(TypeError):
        GroupCommitter(name="neither")
    with pytest.raises(TypeError):
        GroupCommitter(name="no bounds", commit=commit)
