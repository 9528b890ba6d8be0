"""Idempotency keys with Stripe's semantics, stored in the service's database.

The record of a key is written in the same transaction as the effect it guards, so a crash can
never leave an effect without its record (a retry would repeat it) or a record without its effect.
Consequences, all deliberate:

* Same key, same request → the stored first response, replayed with ``Idempotent-Replayed: true``.
* Same key, different request → 422 ``idempotency_key_reused``.
* Same key while the first is still running → the second waits for the first and then replays
  it, so every caller sees the same reply; only if the first runs past ``wait_seconds`` is the
  answer 409 ``idempotency_key_in_use``. Across processes the database does the waiting: PostgreSQL
  blocks the second insert of the key on its unique index, SQLite's BEGIN IMMEDIATE serialises.
* Only successful (2xx) responses are stored. A request that failed wrote nothing, so retrying it
  with the same key runs it again, which is what a client retrying a 4xx/5xx wants.

Keys are scoped to (service, API key) and kept ``idempotency_ttl_hours`` (24 h by default).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import and_, delete, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.datastructures import Headers
from starlette.responses import Response

from keel.core.database import Database
from keel.core.errors import IdempotencyKeyInUse, IdempotencyKeyReused, InvalidIdempotencyKey
from keel.core.tables import idempotency_keys

HEADER = "idempotency-key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255


def key_from_headers(headers: Headers) -> str | None:
    """The request's Idempotency-Key, validated, or None when it sent none."""
    key = headers.get(HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable() or not key.isascii():
        raise InvalidIdempotencyKey(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters."
        )
    return key


def request_fingerprint(operation: str, payload: Any) -> bytes:
    """A hash of what the request asks for, insensitive to JSON whitespace and key order."""
    canonical = json.dumps([operation, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).digest()


@dataclass(frozen=True, slots=True)
class IdempotentRequest:
    """One keyed request: who sent it, its key, and the fingerprint of what it asks for."""

    service: str
    api_key_id: int
    key: str
    fingerprint: bytes

    @property
    def identity(self) -> tuple[str, int, str]:
        return (self.service, self.api_key_id, self.key)


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    body: str

    def to_response(self) -> Response:
        return Response(
            self.body,
            status_code=self.status,
            media_type="application/json",
            headers={REPLAYED_HEADER: "true"},
        )


class IdempotencyStore:
    """Reads and writes key records inside the caller's write transaction."""

    def __init__(self, ttl: timedelta) -> None:
        self.ttl = ttl

    def claim(self, conn: Connection, req: IdempotentRequest) -> StoredResponse | None:
        """Reserve the key in this transaction, or return the response already stored for it."""
        now = datetime.now(UTC)
        dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        inserted = conn.execute(
            dialect_insert(idempotency_keys)
            .values(
                service=req.service,
                api_key_id=req.api_key_id,
                key=req.key,
                request_hash=req.fingerprint,
                created_at=now,
            )
            .on_conflict_do_nothing()
            .returning(idempotency_keys.c.key)
        )
        if inserted.first() is not None:
            return None
        row = conn.execute(select(idempotency_keys).where(self._match(req))).one()
        if _as_utc(row.created_at) < now - self.ttl:
            conn.execute(
                update(idempotency_keys)
                .where(self._match(req))
                .values(
                    request_hash=req.fingerprint,
                    created_at=now,
                    response_status=None,
                    response_body=None,
                )
            )
            return None
        if row.request_hash != req.fingerprint:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was first used with a different request body."
            )
        if row.response_status is None:  # not reachable while records commit with their effect
            raise IdempotencyKeyInUse("A request with this Idempotency-Key is still running.")
        return StoredResponse(row.response_status, row.response_body)

    def complete(self, conn: Connection, req: IdempotentRequest, status: int, body: str) -> None:
        """Store the response to replay, in the same transaction as the effect."""
        conn.execute(
            update(idempotency_keys)
            .where(self._match(req))
            .values(response_status=status, response_body=body)
        )

    def release(self, conn: Connection, req: IdempotentRequest) -> None:
        """Forget a key claimed in this transaction whose request was refused."""
        conn.execute(delete(idempotency_keys).where(self._match(req)))

    async def purge_expired(self, conn: AsyncConnection, service: str, limit: int) -> int:
        """Delete up to ``limit`` of ``service``'s expired records; returns how many."""
        cutoff = datetime.now(UTC) - self.ttl
        old = idempotency_keys.alias("old")  # its own FROM: not correlated with the DELETE's
        expired = (
            select(old.c.service, old.c.api_key_id, old.c.key)
            .where(old.c.service == service, old.c.created_at < cutoff)
            .limit(limit)
        )
        k = idempotency_keys.c
        result = await conn.execute(
            delete(idempotency_keys).where(tuple_(k.service, k.api_key_id, k.key).in_(expired))
        )
        return int(result.rowcount or 0)

    @staticmethod
    def _match(req: IdempotentRequest) -> Any:
        return and_(
            idempotency_keys.c.service == req.service,
            idempotency_keys.c.api_key_id == req.api_key_id,
            idempotency_keys.c.key == req.key,
        )


def _as_utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class InFlight:
    """In-process queue per key, so concurrent duplicates wait for the first instead of racing."""

    def __init__(self, wait_seconds: float = 30.0) -> None:
        self.wait_seconds = wait_seconds
        self._locks: dict[tuple[str, int, str], tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, req: IdempotentRequest) -> AsyncIterator[None]:
        lock, users = self._locks.get(req.identity, (asyncio.Lock(), 0))
        self._locks[req.identity] = (lock, users + 1)
        try:
            try:
                await asyncio.wait_for(lock.acquire(), self.wait_seconds)
            except TimeoutError:
                raise IdempotencyKeyInUse(
                    "A request with this Idempotency-Key is still running; retry later."
                ) from None
            try:
                yield
            finally:
                lock.release()
        finally:
            lock, users = self._locks[req.identity]
            if users <= 1:
                del self._locks[req.identity]
            else:
                self._locks[req.identity] = (lock, users - 1)


class Idempotency:
    """The whole mechanism for a route that creates something in one transaction."""

    def __init__(self, service: str, ttl: timedelta, wait_seconds: float = 30.0) -> None:
        self.service = service
        self.store = IdempotencyStore(ttl)
        self.inflight = InFlight(wait_seconds)

    def request(
        self, headers: Headers, api_key_id: int, operation: str, payload: Any
    ) -> IdempotentRequest | None:
        key = key_from_headers(headers)
        if key is None:
            return None
        return IdempotentRequest(
            self.service, api_key_id, key, request_fingerprint(operation, payload)
        )

    async def run(
        self,
        database: Database,
        req: IdempotentRequest | None,
        create: Callable[[AsyncConnection], Awaitable[BaseModel]],
        status: int = 201,
    ) -> Response:
        """Run ``create`` in one write transaction, guarded by ``req`` if the client sent a key."""
        if req is None:
            async with database.write() as conn:
                body = (await create(conn)).model_dump_json()
            return Response(body, status_code=status, media_type="application/json")
        async with self.inflight.hold(req), database.write() as conn:
            stored = await conn.run_sync(self.store.claim, req)
            if stored is not None:
                return stored.to_response()
            body = (await create(conn)).model_dump_json()
            await conn.run_sync(self.store.complete, req, status, body)
        return Response(body, status_code=status, media_type="application/json")
