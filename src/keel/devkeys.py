"""API keys made from the command line: one key valid on several services' databases."""

from __future__ import annotations

import os

from sqlalchemy import select

from keel.clikit import database_url
from keel.core import migrate
from keel.core.auth import Scope, create_api_key, hash_key
from keel.core.database import Database, create_engine
from keel.core.settings import DATA_DIR
from keel.core.tables import api_keys
from keel.registry import ServiceEntry

DEV_KEY_FILE = DATA_DIR / "dev-admin-key"


async def upgrade_all(entries: list[ServiceEntry]) -> None:
    """Migrate every service's default database."""
    for entry in entries:
        await migrate.upgrade(database_url(entry, None), [entry.migrations])


async def dev_admin_key(entries: list[ServiceEntry]) -> str:
    """Reuse the saved dev key if every service still knows it; otherwise make a new one."""
    raw = DEV_KEY_FILE.read_text().strip() if DEV_KEY_FILE.exists() else ""
    if raw and all([await _key_exists(e, raw) for e in entries]):
        return raw
    raw = await create_key_everywhere(Scope.ADMIN, "dev admin (make run)", entries, None)
    DEV_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 (and an older file made so) before the key is written: never readable by others.
    fd = os.open(DEV_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(raw + "\n")
    return raw


async def _key_exists(entry: ServiceEntry, raw: str) -> bool:
    database = Database(create_engine(database_url(entry, None)))
    try:
        async with database.read() as conn:
            found = await conn.execute(
                select(api_keys.c.id).where(
                    api_keys.c.key_hash == hash_key(raw), api_keys.c.revoked_at.is_(None)
                )
            )
            return found.first() is not None
    finally:
        await database.dispose()


async def create_key_everywhere(
    scope: Scope, name: str, entries: list[ServiceEntry], override_url: str | None
) -> str:
    """One new key, stored in each service's database (once per distinct database)."""
    raw: str | None = None
    seen: set[str] = set()
    for entry in entries:
        url = database_url(entry, override_url)
        if url in seen:  # services sharing one database share its key table
            continue
        seen.add(url)
        await migrate.upgrade(url, [entry.migrations])
        database = Database(create_engine(url))
        try:
            async with database.write() as conn:
                raw = await create_api_key(conn, scope=scope, name=name, raw_key=raw)
        finally:
            await database.dispose()
    assert raw is not None
    return raw
