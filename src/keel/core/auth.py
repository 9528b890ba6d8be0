"""API keys: ``Authorization: Bearer <key>`` or ``X-API-Key``, hashed at rest, scoped.

A key looks like ``keel_<prefix>_<secret>``; only its SHA-256 is stored (the secret is 256 random
bits, so a slow password hash would add latency without adding safety). Answers are cached
in-process (see :class:`ApiKeyVerifier`): known keys for ``api_key_cache_seconds``, so a revoked
key stops working within that window; unknown keys for ``api_key_negative_cache_seconds``, so a
key created just after it was refused works within that one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
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


MAX_KEY_LENGTH = 256  # keel's keys are 57 characters; longer ones are refused unlooked-up


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


class _ExpiringCache(OrderedDict[str, tuple[float, "ApiKey | None"]]):
    """Presented key -> (expiry, answer); at most ``max_entries``, the oldest dropped first.

    All entries of one cache live equally long and a stored entry moves to the end, so insertion
    order is expiry order: expired entries are always at the front.
    """

    def __init__(self, max_entries: int) -> None:
        super().__init__()
        self.max_entries = max_entries

    def put(self, raw: str, expires: float, answer: ApiKey | None, now: float) -> None:
        self[raw] = (expires, answer)
        self.move_to_end(raw)
        while self and (len(self) > self.max_entries or next(iter(self.values()))[0] <= now):
            self.popitem(last=False)


# After a lookup failed, stale keys are answered from the cache this long without asking again:
# a database that is down (or blackholed, each attempt waiting out a connect timeout) must not
# be asked by every request.
AWAY_SECONDS = 1.0


class ApiKeyVerifier:
    """Checks presented keys against the database, with short, bounded in-process caches.

    Both caches are keyed by the presented key itself, so a cached answer costs one dict lookup
    and no SHA-256. That lookup tells an attacker nothing useful: the string hash is keyed by the
    process's secret hash seed, so which slot a guess lands in says nothing about stored keys,
    and the string comparison only runs on a full 64-bit hash match, which a guess cannot aim
    for. A hit only ever reveals that this exact string was presented recently; a wrong guess
    still goes to the database through the SHA-256 index and a constant-time compare.

    Known keys stay ``cache_seconds`` and are refreshed in the background as they near the end
    of that, so the hot path never waits on the database once a key is known (and a revoked key
    stops working within the window). While the database cannot be asked, a key it confirmed
    within the last ``stale_seconds`` keeps working (only then: a revocation the database can
    report still takes effect within ``cache_seconds``). Unknown keys stay
    ``negative_cache_seconds`` (a second by default), so a key created just after a request was
    refused with it works that much later.
    Each cache holds at most ``max_entries``, oldest out first: random bogus keys cost a lookup
    each, but cannot grow memory or push the real keys out. Concurrent misses for one key share
    a single lookup, so an expiring entry does not send every in-flight request to the pool.
    At most ``max_new_lookups`` lookups of keys not seen before run at once per process (the
    rest queue), so a flood of random keys holds a few database connections, never the whole
    pool that known keys' requests need; refreshes of known keys never wait behind it.
    """

    def __init__(
        self,
        database: Database,
        cache_seconds: float,
        negative_cache_seconds: float = 1.0,
        *,
        max_entries: int = 10_000,
        max_new_lookups: int = 4,
        stale_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._database = database
        self._cache_seconds = cache_seconds
        self._stale_seconds = stale_seconds
        self._database_away_until = 0.0  # after a failed lookup, stale keys are not re-asked
        self._negative_seconds = negative_cache_seconds
        self._clock = clock
        self._known = _ExpiringCache(max_entries)
        self._unknown = _ExpiringCache(max_entries)
        self._fetching: dict[str, asyncio.Future[ApiKey | None]] = {}
        self._new_lookups = asyncio.Semaphore(max_new_lookups)

    async def authenticate(self, headers: Headers, required: Scope) -> ApiKey:
        """Return the caller's key or raise 401 (missing/invalid) or 403 (scope too small)."""
        raw = presented_key(headers)
        if raw is None:
            raise Unauthorized("Send an API key as 'Authorization: Bearer <key>' or 'X-API-Key'.")
        key = await self._lookup(raw) if len(raw) <= MAX_KEY_LENGTH else None
        if key is None:
            raise Unauthorized("The API key is invalid or revoked.")
        if not key.scope.allows(required):
            raise Forbidden(
                f"This endpoint needs the '{required}' scope; the key has '{key.scope}'."
            )
        return key

    async def _lookup(self, raw: str) -> ApiKey | None:
        now = self._clock()
        known = self._known.get(raw)
        if known is not None and known[0] <= now:  # past its freshness and its stale time too
            known = self._known.pop(raw) and None
        if known is not None:
            left = known[0] - self._stale_seconds - now
            if left <= 0 and now < self._database_away_until:
                return known[1]  # a lookup just failed: do not make this request wait on another
            if left > 0:
                if left < self._cache_seconds / 5 and raw not in self._fetching:
                    self._refresh(raw)  # nearly stale: look it up again, answer from cache now
                return known[1]
        else:
            unknown = self._unknown.get(raw)
            if unknown is not None and unknown[0] > now:
                return None
        try:
            # shield: one waiter giving up must not cancel the lookup the others wait for
            return await asyncio.shield(self._refresh(raw, new=known is None))
        except Exception:
            self._database_away_until = self._clock() + AWAY_SECONDS
            if known is None:
                raise
            # The database cannot say: a key it confirmed within stale_seconds still works, so
            # a service that buffers writes through an outage keeps its clients.
            return known[1]

    def _refresh(self, raw: str, new: bool = False) -> asyncio.Future[ApiKey | None]:
        """The one lookup of ``raw`` in flight, started if there is none."""
        fetching = self._fetching.get(raw)
        if fetching is None:
            fetching = asyncio.ensure_future(self._fetch_and_cache(raw, new))
            # A background refresh may fail (database away) with nobody awaiting it: the next
            # request that needs the key looks it up again, and sees the error then.
            fetching.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._fetching[raw] = fetching
        return fetching

    async def _fetch_and_cache(self, raw: str, new: bool) -> ApiKey | None:
        try:
            if new:
                async with self._new_lookups:
                    key = await self._fetch(hash_key(raw))
            else:
                key = await self._fetch(hash_key(raw))
        finally:
            del self._fetching[raw]
        now = self._clock()
        if key is None:
            self._known.pop(raw, None)
            self._unknown.put(raw, now + self._negative_seconds, None, now)
        else:
            self._unknown.pop(raw, None)
            # Kept stale_seconds past its freshness, answered from only while lookups fail.
            self._known.put(raw, now + self._cache_seconds + self._stale_seconds, key, now)
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
