"""Statements for hot paths: ids reserved up front, SELECTs and bulk writes compiled once.

SQLAlchemy's execution path costs more than the statements of a group-commit batch or a
primary-key read themselves; these run the compiled SQL on the driver directly, with the
columns' own type conversions, and serve both engines.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from sqlalchemy import Select, Table, func, select
from sqlalchemy.engine import Connection


def allocate_ids(conn: Connection, table: Table, count: int) -> list[int]:
    """Reserve ``count`` primary keys of ``table`` inside the caller's write transaction.

    Lets a batch insert with one executemany instead of one ``INSERT … RETURNING`` per row (SQLite
    cannot promise RETURNING order for a multi-row insert, so SQLAlchemy would fall back to that).
    On SQLite the transaction holds the database's write lock, so ``max(id)`` cannot move under us;
    on PostgreSQL the ids come from the column's own sequence.
    """
    if count == 0:
        return []
    id_column = table.c.id
    if conn.dialect.name == "postgresql":
        sequence = func.pg_get_serial_sequence(table.name, id_column.name)
        rows = conn.execute(
            select(func.nextval(sequence)).select_from(func.generate_series(1, count))
        )
        return [int(value) for value in rows.scalars()]
    first = int(conn.execute(select(func.coalesce(func.max(id_column), 0))).scalar_one()) + 1
    return list(range(first, first + count))


class Lookup:
    """A SELECT compiled once per dialect and run on the driver's own cursor: for hot paths.

    SQLAlchemy's execution path costs more than a primary-key lookup itself. On a plain sqlite3
    connection (``Database.run_read``, ``run_write``) this runs the compiled SQL on it directly;
    on any other it uses
    ``exec_driver_sql``. Either way the columns' own result processors are applied, so values come
    back as SQLAlchemy would return them (``UtcDateTime`` aware, and so on).
    """

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement
        self.keys = [str(column.key) for column in statement.selected_columns]
        self._compiled: dict[str, tuple[str, list[_Param], list[_Processor | None]]] = {}

    def first(self, conn: Connection, **params: Any) -> dict[str, Any] | None:
        """The first row as a dict of column keys, or None."""
        sql, binds, processors = self._compile(conn.dialect)
        args = tuple(params[name] if proc is None else proc(params[name]) for name, proc in binds)
        driver = conn.connection.driver_connection
        if isinstance(driver, sqlite3.Connection):
            row = driver.execute(sql, args).fetchone()
        else:
            row = conn.exec_driver_sql(sql, args).first()
        if row is None:
            return None
        return {
            key: value if proc is None else proc(value)
            for key, value, proc in zip(self.keys, row, processors, strict=True)
        }

    def _compile(self, dialect: Any) -> tuple[str, list[_Param], list[_Processor | None]]:
        cached = self._compiled.get(dialect.name)
        if cached is None:
            compiled = self.statement.compile(dialect=dialect)
            processors: list[_Processor | None] = [
                column.type._cached_result_processor(dialect, None)
                for column in self.statement.selected_columns
            ]
            cached = (compiled.string, _bind_params(compiled, dialect), processors)
            self._compiled[dialect.name] = cached
        return cached


_Processor = Callable[[Any], Any]
_Param = tuple[str, _Processor | None]


def _bind_params(compiled: Any, dialect: Any) -> list[_Param]:
    """Each positional parameter's name, with its type's bind processor (None: pass as is)."""
    binds = {bind.key: bind for bind in compiled.binds.values()}
    return [
        (name, binds[name].type._cached_bind_processor(dialect))
        for name in compiled.positiontup or ()
    ]


class BulkStatement:
    """An INSERT or UPDATE run through the driver's own ``executemany``.

    SQLAlchemy's per-row parameter processing costs more than SQLite's insert itself on the
    group-commit path; this compiles the statement once per dialect and
    applies only the type conversions that matter (timestamps), so the driver does the rest.
    """

    def __init__(self, statement: Any, columns: list[str] | None = None) -> None:
        self.statement = statement
        self.columns = columns  # for an INSERT: the columns every row gives
        self._compiled: dict[str, tuple[str, list[_Param]]] = {}

    def execute(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Run the statement once per row, in one driver call."""
        if not rows:
            return
        sql, params = self._compile(conn.dialect)
        conn.exec_driver_sql(
            sql,
            [
                tuple(row[name] if proc is None else proc(row[name]) for name, proc in params)
                for row in rows
            ],
        )

    def _compile(self, dialect: Any) -> tuple[str, list[_Param]]:
        cached = self._compiled.get(dialect.name)
        if cached is None:
            compiled = self.statement.compile(dialect=dialect, column_keys=self.columns)
            cached = (compiled.string, _bind_params(compiled, dialect))
            self._compiled[dialect.name] = cached
        return cached
