"""Periodic clean-up jobs, run by one process at a time across processes and hosts, in chunks.

Each job has a row in ``keel_maintenance_leases``. A process takes it with one conditional
``UPDATE … WHERE lease_until <= now AND next_run_at <= now``, atomic on both engines (PostgreSQL
re-checks the condition on the row it waited for), so one holder at a time wins on any number of
hosts. The holder then runs the job in chunks of at most ``chunk_rows`` rows, each in its own
short write transaction, yielding between them so no request waits long for the write lock.
Each chunk's transaction first renews the lease *only if this process still holds it*: a holder
that stalled past its lease stops instead of running beside its successor. When the job is done
the row's ``next_run_at`` moves on by ``every``, so the job runs once per interval in total, not
once per process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from keel.core.database import Database
from keel.core.tables import maintenance_leases as leases

log = logging.getLogger("keel.maintenance")

CHUNK_ROWS = 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Deletes (or otherwise handles) at most ``limit`` rows in the caller's transaction; returns how
# many it did. A chunk that returns fewer than ``limit`` is finished.
Chunk = Callable[[AsyncConnection, int], Awaitable[int]]


def process_holder() -> str:
    """An identity for this process that differs across hosts, processes and restarts."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class PeriodicJob:
    """A clean-up job: its chunks run in order, each until it comes up short."""

    name: str  # unique per database: "<service>:<job>"
    chunks: Sequence[Chunk]
    every: timedelta = timedelta(minutes=10)
    lease: timedelta = timedelta(minutes=2)  # far above one chunk's transaction
    chunk_rows: int = CHUNK_ROWS
    holder: str = field(default_factory=process_holder)


async def run_if_due(database: Database, job: PeriodicJob) -> int | None:
    """Run ``job`` if it is due and nobody holds it; rows handled, or None if not run here."""
    if not await _is_due(database, job) or not await _take(database, job):
        return None
    total = 0
    try:
        for chunk in job.chunks:
            while True:
                async with database.write() as conn:
                    if not await _renew(conn, job):
                        log.warning("%s: lease lost after %d rows; stopping", job.name, total)
                        return total
                    done = await chunk(conn, job.chunk_rows)
                total += done
                if done < job.chunk_rows:
                    break
                await asyncio.sleep(0)  # let requests at the write lock between chunks
    except BaseException:
        await asyncio.shield(_release(database, job, next_run_at=None))
        raise
    await _release(database, job, next_run_at=datetime.now(UTC) + job.every)
    return total


async def run_periodically(
    database: Database, jobs: Sequence[PeriodicJob], check_seconds: float = 60.0
) -> None:
    """Run each job whenever it is due, until cancelled; failures are logged and retried."""
    while True:
        for job in jobs:
            try:
                done = await run_if_due(database, job)
            except Exception:
                log.exception("%s failed; will retry", job.name)
            else:
                if done:
                    log.info("%s: %d rows", job.name, done)
        await asyncio.sleep(check_seconds)


async def _is_due(database: Database, job: PeriodicJob) -> bool:
    """A read first, so processes that are not due never queue for the write lock."""
    now = datetime.now(UTC)
    async with database.read() as conn:
        row = (
            await conn.execute(
                select(leases.c.lease_until, leases.c.next_run_at).where(leases.c.name == job.name)
            )
        ).first()
    return row is None or (row.lease_until <= now and row.next_run_at <= now)


async def _take(database: Database, job: PeriodicJob) -> bool:
    now = datetime.now(UTC)
    dialect_insert = pg_insert if database.dialect == "postgresql" else sqlite_insert
    async with database.write() as conn:
        await conn.execute(
            dialect_insert(leases)
            .values(name=job.name, holder=None, lease_until=_EPOCH, next_run_at=now)
            .on_conflict_do_nothing()
        )
        taken = await conn.execute(
            update(leases)
            .where(
                leases.c.name == job.name, leases.c.lease_until <= now, leases.c.next_run_at <= now
            )
            .values(holder=job.holder, lease_until=now + job.lease)
        )
    return bool(taken.rowcount)


async def _renew(conn: AsyncConnection, job: PeriodicJob) -> bool:
    now = datetime.now(UTC)
    renewed = await conn.execute(
        update(leases)
        .where(leases.c.name == job.name, leases.c.holder == job.holder, leases.c.lease_until > now)
        .values(lease_until=now + job.lease)
    )
    return bool(renewed.rowcount)


async def _release(database: Database, job: PeriodicJob, next_run_at: datetime | None) -> None:
    """Free the lease; on success also move the job's next run on (a failed run stays due)."""
    values: dict[str, object] = {"holder": None, "lease_until": _EPOCH}
    if next_run_at is not None:
        values["next_run_at"] = next_run_at
    try:
        async with database.write() as conn:
            await conn.execute(
                update(leases)
                .where(leases.c.name == job.name, leases.c.holder == job.holder)
                .values(**values)
            )
    except Exception as exc:  # the lease expires by itself
        log.warning("%s: could not release its lease: %r", job.name, exc)
