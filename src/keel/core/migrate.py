"""Alembic, driven from code: one migration chain for the core tables, one per service.

Callers name the chains they need (:class:`~keel.core.chains.MigrationChain`); the core chain
always runs first.

Each chain keeps its own version table (``alembic_version_<chain>``), so several services can share
one PostgreSQL database. An upgrade runs in one write transaction (BEGIN IMMEDIATE on SQLite, an
advisory lock on PostgreSQL), so worker processes starting together cannot race each other.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection

from keel.core.chains import CORE_CHAIN, MigrationChain, with_core
from keel.core.database import Database, create_engine

__all__ = ["CORE_CHAIN", "MigrationChain", "pending_migrations", "run_env", "upgrade"]

Chains = Sequence[MigrationChain]


def alembic_config(chain: MigrationChain, connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", chain.script_location)
    cfg.attributes["connection"] = connection
    cfg.attributes["version_table"] = chain.version_table
    return cfg


def run_env(context: Any, target_metadata: MetaData) -> None:
    """The body of every chain's ``env.py``: migrate on the connection we were handed."""
    cfg = context.config
    context.configure(
        connection=cfg.attributes["connection"],
        target_metadata=target_metadata,
        version_table=cfg.attributes["version_table"],
        render_as_batch=True,
        # Several chains share one database: each autogenerates against its own tables only.
        include_name=lambda name, type_, _parent: (
            type_ != "table" or name in target_metadata.tables
        ),
    )
    with context.begin_transaction():
        context.run_migrations()


def _upgrade_chains(connection: Connection, chains: list[MigrationChain]) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(
            text("SELECT pg_advisory_xact_lock(:k)"), {"k": zlib.crc32(b"keel-migrations")}
        )
    for chain in chains:
        command.upgrade(alembic_config(chain, connection), "head")


def _pending_chains(connection: Connection, chains: list[MigrationChain]) -> list[str]:
    pending = []
    for chain in chains:
        context = MigrationContext.configure(
            connection, opts={"version_table": chain.version_table}
        )
        head = ScriptDirectory.from_config(alembic_config(chain)).get_current_head()
        if context.get_current_revision() != head:
            pending.append(chain.name)
    return pending


async def upgrade(database_url: str, chains: Chains) -> None:
    """Bring a database to the newest schema of the core chain and then of ``chains``."""
    database = Database(create_engine(database_url))
    try:
        async with database.write() as conn:
            await conn.run_sync(_upgrade_chains, with_core(chains))
    finally:
        await database.dispose()


async def pending_migrations(database: Database, chains: Chains) -> list[str]:
    """The names of the chains (the core's and ``chains``) not yet at head; empty when current."""
    async with database.read() as conn:
        return await conn.run_sync(_pending_chains, with_core(chains))
