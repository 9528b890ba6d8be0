"""What a failed write tells the client: nothing written (503, retry) or outcome unknown (502).

The connection is cut by a proxy at an exact point of the protocol, on the real PostgreSQL: just
before COMMIT is sent (the server rolls back: safe to retry) or after it (the server commits, the
client never hears: only a retry with the same Idempotency-Key is safe). Both the plain
``Database.write`` path and the group-commit path (``Writer``, raw asyncpg calls included) are
checked, and the database is read afterwards to show each answer was the truth.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.util import await_only

from keel.core.batching import GroupCommitter
from keel.core.database import Database, create_engine
from keel.core.errors import OutcomeUnknown, render_exception
from tests.support.cutting_proxy import CuttingProxy

CUT_HERE = "/* cut-here */"


@pytest.fixture
async def scratch(database: Database) -> AsyncIterator[str]:
    """A table of this test's own, on the test's engine."""
    name = f"scratch_{uuid.uuid4().hex[:10]}"
    async with database.write() as conn:
        await conn.execute(text(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, v TEXT)"))
    yield name
    async with database.write() as conn:
        await conn.execute(text(f"DROP TABLE {name}"))


@pytest.fixture
async def proxied(postgres_url: str) -> AsyncIterator[tuple[Database, CuttingProxy]]:
    """A Database whose every connection passes through a :class:`CuttingProxy`."""
    url = make_url(postgres_url)
    proxy = await CuttingProxy(url.host or "127.0.0.1", url.port or 5432).start()
    through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    database = Database(create_engine(through))
    yield database, proxy
    await database.dispose()
    await proxy.close()


async def _rows(database: Database, table: str) -> list[int]:
    async with database.read() as conn:
        return list((await conn.execute(text(f"SELECT id FROM {table} ORDER BY id"))).scalars())


async def _scratch_table(database: Database) -> str:
    name = f"scratch_{uuid.uuid4().hex[:10]}"
    async with database.write() as conn:
        await conn.execute(text(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, v TEXT)"))
    return name


def _chain(exc: BaseException | None) -> list[BaseException]:
    out = []
    while exc is not None and len(out) < 10:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _assert_outcome_unknown(exc: BaseException) -> None:
    assert isinstance(exc, OutcomeUnknown)
    response = render_exception(exc)
    assert response.status_code == 502
    assert "retry-after" not in response.headers
    assert b'"code":"outcome_unknown"' in response.body
    assert b"same Idempotency-Key" in response.body


def _assert_nothing_written_answer(exc: Exception) -> None:
    response = render_exception(exc)
    assert response.status_code == 503, response.body
    assert response.headers["retry-after"] == "1"
    assert b'"code":"database_unavailable"' in response.body


async def test_write_lost_during_commit_is_outcome_unknown(
    proxied: tuple[Database, CuttingProxy],
) -> None:
    database, proxy = proxied
    table = await _scratch_table(database)
    proxy.arm(b"COMMIT", forward=True)
    with pytest.raises(OutcomeUnknown) as caught:
        async with database.write() as conn:
            await conn.execute(text(f"INSERT INTO {table} (id, v) VALUES (1, 'a')"))
    _assert_outcome_unknown(caught.value)
    assert proxy.cuts == 1
    # The server did commit: a 503 "retry" here would have let the client write it twice.
    assert await _rows(database, table) == [1]


async def test_write_lost_before_commit_is_503_and_nothing_written(
    proxied: tuple[Database, CuttingProxy],
) -> None:
    database, proxy = proxied
    table = await _scratch_table(database)
    proxy.arm(CUT_HERE.encode(), forward=False)
    with pytest.raises(Exception) as caught:
        async with database.write() as conn:
            await conn.execute(text(f"INSERT INTO {table} (id, v) VALUES (1, 'a')"))
            await conn.execute(text(f"SELECT 1 {CUT_HERE}"))
    assert not isinstance(caught.value, OutcomeUnknown)
    _assert_nothing_written_answer(caught.value)
    assert await _rows(database, table) == []


def _insert_raw(table: str, marker: str = "") -> Any:
    """A batch ``apply`` that writes through asyncpg itself, as the ledger's hot path does."""

    def apply(conn: Connection, items: list[int]) -> list[int]:
        driver: Any = conn.connection.driver_connection
        if not driver.is_in_transaction():  # the Writer's BEGIN comes with the first statement
            conn.execute(text("SELECT 1"))
        await_only(
            driver.executemany(
                f"INSERT INTO {table} (id, v) VALUES ($1, 'x') {marker}", [(i,) for i in items]
            )
        )
        return items

    return apply


async def test_group_commit_lost_during_commit_is_outcome_unknown(
    proxied: tuple[Database, CuttingProxy],
) -> None:
    database, proxy = proxied
    table = await _scratch_table(database)
    committer: GroupCommitter[int, int] = GroupCommitter(
        name="test_cut_commit", database=database, apply=_insert_raw(table)
    )
    committer.start()
    try:
        assert await committer.submit(1) == 1
        proxy.arm(b"COMMIT", forward=True)
        with pytest.raises(OutcomeUnknown) as caught:
            await committer.submit(2)
        _assert_outcome_unknown(caught.value)
        assert await committer.submit(3) == 3  # the writer reconnects by itself
    finally:
        await committer.stop()
    assert await _rows(database, table) == [1, 2, 3]


async def test_raw_asyncpg_error_before_commit_is_503_not_500(
    proxied: tuple[Database, CuttingProxy],
) -> None:
    database, proxy = proxied
    table = await _scratch_table(database)
    committer: GroupCommitter[int, int] = GroupCommitter(
        name="test_cut_raw", database=database, apply=_insert_raw(table, CUT_HERE)
    )
    committer.start()
    try:
        proxy.arm(CUT_HERE.encode(), forward=False)
        with pytest.raises(Exception) as caught:
            await committer.submit(1)
        # asyncpg's own "connection was closed in the middle of operation", unwrapped (the
        # rollback that follows may fail too and take its place).
        assert any(isinstance(e, asyncpg.ConnectionDoesNotExistError) for e in _chain(caught.value))
        _assert_nothing_written_answer(caught.value)
        assert await committer.submit(2) == 2
    finally:
        await committer.stop()
    assert await _rows(database, table) == [2]


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.DeadlockDetectedError("deadlock detected"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
        OSError(113, "No route to host"),
    ],
)
def test_no_database_error_renders_as_500(error: Exception) -> None:
    _assert_nothing_written_answer(error)


async def test_bound_values_appear_in_no_error_or_log(
    database: Database, scratch: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"tok_{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)
    statement = text(f"INSERT INTO {scratch} (id, v) VALUES (:id, :v)")
    async with database.write() as conn:
        await conn.execute(statement, {"id": 1, "v": "first"})
    with pytest.raises(Exception) as on_write:
        async with database.write() as conn:
            await conn.execute(statement, {"id": 1, "v": secret})  # duplicate key
    with pytest.raises(Exception) as on_batch:
        await database.run_write(lambda conn: conn.execute(statement, {"id": 1, "v": secret}))
    for caught in (on_write, on_batch):
        assert "parameters hidden" in str(caught.value)
        assert secret not in str(caught.value)
        render_exception(caught.value)  # logs it
    assert secret not in caplog.text
