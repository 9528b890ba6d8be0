"""Reads: snapshots hold for a whole transaction, and a Lookup answers what SQLAlchemy would.

These tests share PostgreSQL's database with the ledger's, whose audit checks every balance: so
they change overdraft limits, never balances.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection, make_url

from keel.core.database import Database, create_engine
from keel.core.statements import Lookup
from keel.ledger.registration import MIGRATIONS
from keel.ledger.tables import users
from tests import backends

_USER = select(users.c.id, users.c.username, users.c.overdraft_limit, users.c.created_at).where(
    users.c.id == bindparam("user_id")
)
_LOOKUP = Lookup(_USER)


async def _new_user(database: Database, limit: int = 0) -> int:
    async with database.write() as conn:
        created = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
        user_id: int = (
            await conn.execute(
                insert(users)
                .values(
                    username=f"reads-{datetime.now(UTC).timestamp()}",
                    balance=0,
                    overdraft_limit=limit,
                    created_at=created,
                )
                .returning(users.c.id)
            )
        ).scalar_one()
    return user_id


async def _set_limit(database: Database, user_id: int, limit: int) -> None:
    async with database.write() as conn:
        await conn.execute(update(users).where(users.c.id == user_id).values(overdraft_limit=limit))


async def test_a_lookup_returns_what_sqlalchemy_returns(database: Database) -> None:
    user_id = await _new_user(database, limit=42)

    def both(conn: Connection) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        expected = conn.execute(_USER, {"user_id": user_id}).mappings().one()
        return _LOOKUP.first(conn, user_id=user_id), dict(expected)

    # run_read: a plain sqlite3 connection on SQLite, asyncpg through the greenlet on PostgreSQL.
    fast, expected = await database.run_read(both)
    assert fast == expected
    assert fast["overdraft_limit"] == 42
    assert fast["created_at"] == datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    # And through an ordinary async connection (aiosqlite on SQLite): the exec_driver_sql path.
    async with database.read() as conn:
        assert await conn.run_sync(lambda c: _LOOKUP.first(c, user_id=user_id)) == expected


async def test_a_lookup_of_a_missing_row_is_none(database: Database) -> None:
    assert await database.run_read(lambda conn: _LOOKUP.first(conn, user_id=2**40)) is None


async def test_a_read_sees_one_snapshot_while_a_write_commits(database: Database) -> None:
    user_id = await _new_user(database, limit=1)
    async with database.read() as conn:
        query = select(users.c.overdraft_limit).where(users.c.id == user_id)
        assert (await conn.execute(query)).scalar_one() == 1
        await _set_limit(database, user_id, 2)
        assert (await conn.execute(query)).scalar_one() == 1
    async with database.read() as conn:
        assert (await conn.execute(query)).scalar_one() == 2


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return backends.migrated_sqlite_url(tmp_path, [MIGRATIONS])


async def test_run_read_on_sqlite_sees_one_snapshot(sqlite_url: str) -> None:
    """The direct reader is in autocommit mode; run_read must still hold one snapshot."""
    url = sqlite_url
    database = Database(create_engine(url))
    other = sqlite3.connect(make_url(url).database or "")
    try:
        user_id = await _new_user(database, limit=1)

        def limit(conn: Connection) -> int:
            row = _LOOKUP.first(conn, user_id=user_id)
            assert row is not None
            return int(row["overdraft_limit"])

        def read_twice(conn: Connection) -> tuple[int, int]:
            first = limit(conn)
            with other:  # commits another connection's write between the two reads
                other.execute(
                    "UPDATE ledger_users SET overdraft_limit = 2 WHERE id = ?", (user_id,)
                )
            return first, limit(conn)

        assert await database.run_read(read_twice) == (1, 1)
        assert await database.run_read(limit) == 2
    finally:
        other.close()
        await database.dispose()
