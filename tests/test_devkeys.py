"""The dev admin key ``make run`` prints: private on disk, and never a revoked one reused."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import update

from keel import devkeys
from keel.clikit import database_url
from keel.core.auth import hash_key
from keel.core.database import Database, create_engine
from keel.core.tables import api_keys
from keel.registry import services


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # data/ is relative: every default database lands here
    for name in services():
        monkeypatch.delenv(f"KEEL_{name.upper()}_DATABASE_URL", raising=False)
    monkeypatch.delenv("KEEL_DATABASE_URL", raising=False)
    return tmp_path


async def test_the_key_file_is_never_readable_by_others(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = list(services().values())
    await devkeys.upgrade_all(entries)
    seen: list[int] = []
    chmod = Path.chmod

    def spy(path: Path, mode: int, **kwargs: bool) -> None:
        seen.append(stat.S_IMODE(path.stat().st_mode))  # what the key was on disk with until now
        chmod(path, mode, **kwargs)

    monkeypatch.setattr(Path, "chmod", spy)
    old = os.umask(0o022)
    try:
        devkeys.DEV_KEY_FILE.parent.mkdir(exist_ok=True)
        devkeys.DEV_KEY_FILE.write_text("stale\n")  # an earlier version's file, 0644
        await devkeys.dev_admin_key(entries)
    finally:
        os.umask(old)
    assert all(mode & 0o077 == 0 for mode in seen), [oct(m) for m in seen]
    assert stat.S_IMODE(devkeys.DEV_KEY_FILE.stat().st_mode) == 0o600


async def test_a_revoked_dev_key_is_replaced(in_tmp: Path) -> None:
    entries = list(services().values())
    await devkeys.upgrade_all(entries)
    first = await devkeys.dev_admin_key(entries)
    for entry in entries:
        database = Database(create_engine(database_url(entry, None)))
        try:
            async with database.write() as conn:
                await conn.execute(
                    update(api_keys)
                    .where(api_keys.c.key_hash == hash_key(first))
                    .values(revoked_at=datetime.now(UTC))
                )
        finally:
            await database.dispose()
    second = await devkeys.dev_admin_key(entries)
    assert second != first
    assert devkeys.DEV_KEY_FILE.read_text().strip() == second
