"""API keys: ``Authorization: Bearer <key>`` or ``X-API-Key``, hashed at rest, scoped.

A key looks like ``keel_<prefix>_<secret>``; only its SHA-256 is stored (the secret is 256 random
bits, so a slow password hash would add latency without adding safety). Verified keys are cached
in-process for ``api_key_cache_seconds`` so the hot path does not query the database each time;
a revoked key stops working within that window.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Row, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.datastructures import Headers

from keel.core.database import Database
from keel.core.errors import Forbidden, Unauthorized
from keel.core.tables import api_keys


class Scope(StrEnum):
    """What a key may do. Each scope includes the ones below it."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, required: Scope) -> bool:
        return self.rank >= required.rank


_RANK = {Scope.READ: 0, Scope.WRITE: 1, Scope.ADMIN: 2}


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An authenticated caller."""

    id: int
    scope: Scope
    key_hash: bytes


def hash_key(raw: str) -> bytes:
    return hashlib.sha256(raw.encode()).digest()


def generate_key() -> str:
    return f"keel_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"


async def create_api_key(
    conn: AsyncConnection, *, scope: Scope, name: str = "", raw_key: str | None = None
) -> str:
    """Store a new key and return it; this is the only time the raw key exists."""
    raw = raw_key or generate_key()
    await conn.execute(
        insert(api_keys).values(
            prefix=raw[:13],
            key_hash=hash_key(raw),
            scope=scope.value,
            name=name,
            created_at=datetime.now(UTC),
        )
    )
    return raw


def presented_key(headers: Headers) -> str | None:
    """The key a request carries, from ``Authorization: Bearer`` or ``X-API-Key``."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
        return None
    return headers.get("x-api-key") or None


class ApiKeyVerifier:
    """Checks presented keys against the database, with a short in-process cache.

    The hot path never waits on the database once a key is known: a cached key is refreshed in the
    background when it nears the end of its lifetime, and concurrent misses for one key share a
    single lookup. (Before, every in-flight request missed at the same instant when an entry
    expired, and 64 of them queued at once for the connection pool: a stall every few seconds.)
    """

    def __init__(self, database: Database, cache_seconds: float) -> None:
        self._database = database
        self._cache_seconds = cache_seconds
        self._cache: dict[bytes, tuple[float, ApiKey | None]] = {}
        self._fetching: dict[bytes, asyncio.Future[ApiKey | None]] = {}

    async def authenticate(self, headers: Headers, required: Scope) -> ApiKey:
        """Return the caller's key or raise 401 (missing/invalid) or 403 (scope too small)."""
        raw = presented_key(headers)
        if raw is None:
            raise Unauthorized("Send an API key as 'Authorization: Bearer <key>' or 'X-API-Key'.")
        key = await self._lookup(hash_key(raw))
        if key is None:
            raise Unauthorized("The API key is invalid or revoked.")
        if not key.scope.allows(required):
            raise Forbidden(
                f"This endpoint needs the '{required}' scope; the key has '{key.scope}'."
            )
        return key

    async def _lookup(self, digest: bytes) -> ApiKey | None:
        cached = self._cache.get(digest)
        left = cached[0] - time.monotonic() if cached is not None else 0.0
        if cached is None or left <= 0:
            # shield: one waiter giving up must not cancel the lookup the others wait for
            return await asyncio.shield(self._refresh(digest))
        if left < self._cache_seconds / 5 and digest not in self._fetching:
            self._refresh(digest)  # nearly stale: look it up again, answer from the cache now
        return cached[1]

    def _refresh(self, digest: bytes) -> asyncio.Future[ApiKey | None]:
        """The one lookup of ``digest`` in flight, started if there is none."""
        fetching = self._fetching.get(digest)
        if fetching is None:
            fetching = asyncio.ensure_future(self._fetch_and_cache(digest))
            # A background refresh may fail (database away) with nobody awaiting it: the next
            # request that needs the key looks it up again, and sees the error then.
            fetching.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._fetching[digest] = fetching
        return fetching

    async def _fetch_and_cache(self, digest: bytes) -> ApiKey | None:
        try:
            key = await self._fetch(digest)
        finally:
            del self._fetching[digest]
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (time.monotonic() + self._cache_seconds, key)
        return key

    async def _fetch(self, digest: bytes) -> ApiKey | None:
        def find(conn: Connection) -> Row[Any, Any, Any] | None:
            return conn.execute(
                select(api_keys.c.id, api_keys.c.scope, api_keys.c.key_hash).where(
                    api_keys.c.key_hash == digest, api_keys.c.revoked_at.is_(None)
                )
            ).first()

        row = await self._database.run_read(find)
        # The index lookup already matched; compare_digest keeps the final check constant-time.
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            return None
        return ApiKey(id=row.id, scope=Scope(row.scope), key_hash=row.key_hash)
