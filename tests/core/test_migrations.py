"""The migrations build exactly the tables the code declares, on both engines."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection

from keel.core.database import Database
from keel.core.migrate import pending_migrations
from keel.core.tables import metadata as core_metadata
from keel.ledger.registration import MIGRATIONS
from keel.ledger.tables import metadata as ledger_metadata


def _diff(conn: Connection, metadata: MetaData) -> list[Any]:
    context = MigrationContext.configure(
        conn,
        opts={
            "include_name": lambda name, type_, _parent: (
                type_ != "table" or name in metadata.tables
            ),
        },
    )
    return list(compare_metadata(context, metadata))


async def test_schema_matches_the_tables_in_code(database: Database) -> None:
    async with database.read() as conn:
        for metadata in (core_metadata, ledger_metadata):
            assert await conn.run_sync(_diff, metadata) == []


async def test_a_migrated_database_has_nothing_pending(database: Database) -> None:
    assert await pending_migrations(database, [MIGRATIONS]) == []
