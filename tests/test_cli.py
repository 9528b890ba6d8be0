"""The keel command line, run as a user would: against a real database file or PostgreSQL."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from sqlalchemy import select, text, update
from typer.testing import CliRunner

from keel.cli import app
from keel.core.auth import hash_key
from keel.core.database import Database, create_engine
from keel.core.tables import api_keys
from keel.ledger.tables import users
from keel.registry import services

runner = CliRunner()


async def _key_scope(url: str, raw: str) -> str | None:
    database = Database(create_engine(url))
    try:
        async with database.read() as conn:
            row = (
                await conn.execute(
                    select(api_keys.c.scope).where(api_keys.c.key_hash == hash_key(raw))
                )
            ).first()
        return None if row is None else str(row.scope)
    finally:
        await database.dispose()


def test_db_upgrade_then_apikey_create_stores_only_the_hash(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    upgraded = runner.invoke(app, ["db", "upgrade", "ledger", "--database-url", url])
    created = runner.invoke(
        app, ["apikey", "create", "--scope", "write", "--service", "ledger", "--database-url", url]
    )
    assert upgraded.exit_code == 0, upgraded.output
    assert created.exit_code == 0, created.output
    raw = created.output.strip().splitlines()[-1]
    assert raw.startswith("keel_")
    assert asyncio.run(_key_scope(url, raw)) == "write"


def test_apikey_create_refuses_an_unknown_scope(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    result = runner.invoke(app, ["apikey", "create", "--scope", "root", "--database-url", url])
    assert result.exit_code != 0


def test_driver_qualified_urls_are_accepted(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    result = runner.invoke(app, ["db", "upgrade", "ledger", "--database-url", url])
    assert result.exit_code == 0, result.output


def test_ledger_audit_exit_code_follows_the_books(database_url: str) -> None:
    clean = runner.invoke(app, ["ledger", "audit", "--database-url", database_url])
    assert clean.exit_code == 0, clean.output
    assert "0 mismatched" in clean.output

    async def corrupt() -> int:
        database = Database(create_engine(database_url))
        try:
            async with database.write() as conn:
                user_id = (
                    await conn.execute(
                        text(
                            "INSERT INTO ledger_users (username, balance, overdraft_limit,"
                            " created_at) VALUES (:u, 7, 0, CURRENT_TIMESTAMP) RETURNING id"
                        ),
                        {"u": f"corrupt-{id(conn)}"},
                    )
                ).scalar_one()
            return int(user_id)
        finally:
            await database.dispose()

    async def repair(user_id: int) -> None:
        database = Database(create_engine(database_url))
        try:
            async with database.write() as conn:
                await conn.execute(update(users).where(users.c.id == user_id).values(balance=0))
        finally:
            await database.dispose()

    user_id = asyncio.run(corrupt())
    try:
        broken = runner.invoke(app, ["ledger", "audit", "--database-url", database_url])
        assert broken.exit_code == 1
        assert f"user {user_id}" in broken.output
    finally:
        asyncio.run(repair(user_id))


@pytest.mark.parametrize("scope", ["read", "admin"])
def test_keys_for_every_scope(tmp_path: Path, scope: str) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    created = runner.invoke(app, ["apikey", "create", "--scope", scope, "--database-url", url])
    assert created.exit_code == 0, created.output
    assert asyncio.run(_key_scope(url, created.output.strip().splitlines()[-1])) == scope


def test_commands_come_from_the_registry() -> None:
    top = runner.invoke(app, ["--help"]).output
    groups = [name for name, entry in services().items() if entry.cli]
    for command in ("serve", "run", "db", "apikey", "bench", "prove", *groups):
        assert re.search(rf"^│ {command} ", top, re.M), command
    assert "audit" in runner.invoke(app, ["ledger", "--help"]).output
    assert re.search(r"^│ ledger ", runner.invoke(app, ["bench", "--help"]).output, re.M)
    assert re.search(r"^│ inventory ", runner.invoke(app, ["prove", "--help"]).output, re.M)


def test_an_unknown_service_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    result = runner.invoke(app, ["db", "upgrade", "nosuch", "--database-url", url])
    assert result.exit_code == 2
    assert not (tmp_path / "cli.db").exists()


def test_bench_names_its_scenarios_when_given_an_unknown_one() -> None:
    result = runner.invoke(app, ["bench", "ledger", "--scenario", "nosuch"])
    assert result.exit_code == 2
    assert "sqlite-post-spread" in result.output and "reference-noop" in result.output


def test_bench_chooses_among_scenarios_and_probes() -> None:
    result = runner.invoke(app, ["bench", "firehose", "--scenario", "nosuch"])
    assert result.exit_code == 2
    assert "sqlite-event" in result.output and "redis-drain-2m" in result.output


def test_bench_settings_must_be_name_value(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["bench", "ledger", "-s", "reference-bare", "--env", "NOEQUALS", "--work-dir",
              str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "NAME=VALUE" in result.output
