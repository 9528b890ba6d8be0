"""Database URLs: plain or driver-qualified in, the async driver's form out."""

from __future__ import annotations

import pytest

from keel.core.database import async_url


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///data/ledger.db", "sqlite+aiosqlite:///data/ledger.db"),
        ("sqlite:////abs/path/ledger.db", "sqlite+aiosqlite:////abs/path/ledger.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite+pysqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://u:p@db:5432/keel", "postgresql+asyncpg://u:p@db:5432/keel"),
        ("postgres://u:p@db:5432/keel", "postgresql+asyncpg://u:p@db:5432/keel"),
        ("postgresql+psycopg2://u@db/keel", "postgresql+asyncpg://u@db/keel"),
        ("postgresql+asyncpg://u@db/keel", "postgresql+asyncpg://u@db/keel"),
        (
            "postgresql://u@db/keel?sslmode=require",
            "postgresql+asyncpg://u@db/keel?sslmode=require",
        ),
    ],
)
def test_async_url_picks_the_async_driver(given: str, expected: str) -> None:
    assert async_url(given) == expected


def test_async_url_keeps_the_password() -> None:
    """Rendering a URL hides its password by default; the engine needs the real one."""
    assert "s3cr%40t" in async_url("postgresql://keel:s3cr%40t@db/keel")


@pytest.mark.parametrize(
    "url", ["mysql://u@db/keel", "oracle://u@db/keel", "mssql+pyodbc://u@db/keel", "redis://x"]
)
def test_async_url_refuses_other_databases(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported database"):
        async_url(url)
