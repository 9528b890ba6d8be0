"""Clean-up jobs: bounded chunks, one holder at a time across processes, checked in the database.

Two :class:`Database` objects on one database stand for two processes (or hosts): each has its
own engine and connections, and nothing in Python is shared between them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from keel.core.database import Database, create_engine
from keel.core.idempotency import IdempotencyStore, IdempotentRequest
from keel.core.maintenance import PeriodicJob, run_if_due
from keel.core.tables import idempotency_keys, maintenance_leases

TTL = timedelta(hours=24)


@pytest.fixture
async def other_process(database_url: str) -> AsyncIterator[Database]:
    db = Database(create_engine(database_url))
    yield db
    await db.dispose()


@pytest.fixture
def service() -> str:
    return f"svc-{uuid.uuid4().hex[:10]}"


async def add_keys(database: Database, service: str, count: int, age: timedelta) -> None:
    created = datetime.now(UTC) - age
    async with database.write() as conn:
        await conn.execute(
            insert(idempotency_keys),
            [
                {
                    "service": service,
                    "api_key_id": 1,
                    "key": uuid.uuid4().hex,
                    "request_hash": b"\0" * 32,
                    "created_at": created,
                }
                for _ in range(count)
            ],
        )


async def count_keys(database: Database, service: str, expired: bool) -> int:
    cutoff = datetime.now(UTC) - TTL
    age = idempotency_keys.c.created_at
    async with database.read() as conn:
        query = select(func.count()).where(
            idempotency_keys.c.service == service, age < cutoff if expired else age >= cutoff
        )
        return int((await conn.execute(query)).scalar_one())


async def lease_row(database: Database, name: str) -> Any:
    async with database.read() as conn:
        query = select(maintenance_leases).where(maintenance_leases.c.name == name)
        return (await conn.execute(query)).one()


def key_purge(service: str, sizes: list[int], name: str | None = None) -> PeriodicJob:
    """The idempotency purge as the app runs it, recording each chunk's size."""
    store = IdempotencyStore(TTL)

    async def expired(conn: AsyncConnection, limit: int) -> int:
        done = await store.purge_expired(conn, service, limit)
        sizes.append(done)
        return done

    return PeriodicJob(name=name or f"{service}:idempotency-purge", chunks=[expired])


async def test_the_idempotency_purge_runs_in_bounded_chunks(
    database: Database, service: str
) -> None:
    await add_keys(database, service, 2_500, age=TTL + timedelta(hours=1))
    await add_keys(database, service, 10, age=timedelta(hours=1))
    await add_keys(database, f"{service}-x", 5, age=TTL + timedelta(hours=1))
    async with database.write() as conn:  # one chunk deletes at most its limit
        assert await IdempotencyStore(TTL).purge_expired(conn, service, 1_000) == 1_000
    assert await count_keys(database, service, expired=True) == 1_500
    sizes: list[int] = []
    assert await run_if_due(database, key_purge(service, sizes)) == 1_500
    assert sizes == [1_000, 500]  # each chunk its own transaction, none above 1,000 rows
    assert await count_keys(database, service, expired=True) == 0
    assert await count_keys(database, service, expired=False) == 10  # unexpired keys stay
    assert await count_keys(database, f"{service}-x", expired=True) == 5  # another service's


async def test_one_process_at_a_time_holds_a_job(
    database: Database, other_process: Database, service: str
) -> None:
    await add_keys(database, service, 30, age=TTL + timedelta(hours=1))
    entered, proceed = asyncio.Event(), asyncio.Event()
    first_sizes: list[int] = []
    first = key_purge(service, first_sizes)
    real_chunk = first.chunks[0]

    async def held(conn: AsyncConnection, limit: int) -> int:
        entered.set()
        await proceed.wait()
        return await real_chunk(conn, limit)

    first = PeriodicJob(name=first.name, chunks=[held])
    running = asyncio.create_task(run_if_due(database, first))
    await asyncio.wait_for(entered.wait(), 20)
    held_row = await lease_row(other_process, first.name)
    assert held_row.holder == first.holder and held_row.lease_until > datetime.now(UTC)
    second_sizes: list[int] = []
    second = key_purge(service, second_sizes)
    assert second.holder != first.holder
    skipped = await asyncio.wait_for(run_if_due(other_process, second), 20)
    assert skipped is None  # held: the other process skips at once
    proceed.set()
    assert await asyncio.wait_for(running, 20) == 30
    done_row = await lease_row(other_process, first.name)
    assert done_row.holder is None
    assert done_row.next_run_at > datetime.now(UTC) + first.every - timedelta(minutes=1)
    assert await run_if_due(other_process, second) is None  # done for this interval
    assert second_sizes == [] and await count_keys(database, service, expired=True) == 0


async def test_of_two_processes_starting_together_one_runs(
    database: Database, other_process: Database, service: str
) -> None:
    for attempt in range(5):
        name = f"{service}:race-{attempt}"
        sizes: list[int] = []
        results = await asyncio.gather(
            run_if_due(database, key_purge(service, sizes, name)),
            run_if_due(other_process, key_purge(service, sizes, name)),
        )
        assert results.count(None) == 1 and results.count(0) == 1, results
        assert sizes == [0]  # the job's chunk ran once, in the process that took the lease


async def test_a_holder_whose_lease_lapsed_stops(database: Database, service: str) -> None:
    await add_keys(database, service, 25, age=TTL + timedelta(hours=1))
    sizes: list[int] = []
    job = key_purge(service, sizes)
    job = PeriodicJob(name=job.name, chunks=job.chunks, chunk_rows=10)
    real_chunk = job.chunks[0]

    async def stalls(conn: AsyncConnection, limit: int) -> int:
        done = await real_chunk(conn, limit)
        if len(sizes) == 1:  # as if this process stalled and another took the job over
            await conn.execute(
                update(maintenance_leases)
                .where(maintenance_leases.c.name == job.name)
                .values(holder="someone-else")
            )
        return done

    job = PeriodicJob(name=job.name, chunks=[stalls], chunk_rows=10, holder=job.holder)
    assert await run_if_due(database, job) == 10
    assert sizes == [10] and await count_keys(database, service, expired=True) == 15
    assert (await lease_row(database, job.name)).holder == "someone-else"


async def test_the_purge_spares_an_expired_key_taken_over_while_it_waited(
    postgres_url: str, service: str
) -> None:
    """PostgreSQL: a purge that picked an expired key, then waited for the claim that took it
    over, must not delete the fresh record: a retry with that key would then run again."""
    first, second = (Database(create_engine(postgres_url)) for _ in range(2))
    try:
        store = IdempotencyStore(TTL)
        await add_keys(first, service, 1, age=TTL + timedelta(hours=1))
        async with first.read() as conn:
            (key,) = (
                await conn.execute(
                    select(idempotency_keys.c.key).where(idempotency_keys.c.service == service)
                )
            ).scalars()
        req = IdempotentRequest(service, 1, key, b"\1" * 32)
        purge: asyncio.Task[int] | None = None

        async def purge_expired() -> int:
            async with second.write() as conn:
                return await store.purge_expired(conn, service, 1_000)

        async with first.write() as conn:
            assert await conn.run_sync(store.claim, req) is None  # taken over
            await conn.run_sync(store.complete, req, 201, '{"id":1}')
            purge = asyncio.create_task(purge_expired())
            await _until_blocked(first, service)  # the purge waits for this transaction
        assert await asyncio.wait_for(purge, 20) == 0
        async with first.read() as conn:
            row = (
                await conn.execute(
                    select(idempotency_keys).where(
                        idempotency_keys.c.service == service, idempotency_keys.c.key == key
                    )
                )
            ).one()
        assert (row.request_hash, row.response_status) == (b"\1" * 32, 201)
    finally:
        await first.dispose()
        await second.dispose()


async def _until_blocked(database: Database, service: str) -> None:
    """Wait until some session is waiting for a lock while deleting ``service``'s keys."""
    for _ in range(200):
        async with database.read() as conn:
            waiting = (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE 'DELETE FROM keel_idempotency_keys%'"
                    )
                )
            ).scalar_one()
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the purge never waited for the claim")
