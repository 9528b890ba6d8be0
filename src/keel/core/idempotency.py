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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import delete, insert, select, tuple_
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.datastructures import Headers
from starlette.responses import Response

from keel.core.batching import GroupCommitter
from keel.core.database import Database
from keel.core.errors import (
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    KeelError,
)
from keel.core.statements import BulkStatement
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


Claim = StoredResponse | KeelError | None
"""What claiming a key gives: None (claimed: go ahead), the response to replay, or a refusal."""

# Keys are claimed in identity order: two transactions holding some of the same keys queue on the
# first key they share and so can never wait on each other in a cycle. An expired record is taken
# over in the same statement; a live one is locked (so no purge removes it before it is read) and
# not returned.
_PG_CLAIM = """
INSERT INTO keel_idempotency_keys AS k (service, api_key_id, key, request_hash, created_at)
SELECT c.service, c.api_key_id, c.key, c.request_hash, $5
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bytea[])
    AS c(service, api_key_id, key, request_hash)
ON CONFLICT (service, api_key_id, key) DO UPDATE
SET request_hash = excluded.request_hash, created_at = excluded.created_at,
    response_status = NULL, response_body = NULL
WHERE k.created_at < $6
RETURNING k.service, k.api_key_id, k.key
"""

# Responses are stored through the primary key's conflict (the claimed row is always there), not
# an UPDATE joined to the arrays: such a join is planned from table statistics, and a table that
# has not been analysed yet gets a full scan of every record per batch.
_PG_RECORD_CTES = """stored_responses AS (
    INSERT INTO keel_idempotency_keys AS k
        (service, api_key_id, key, request_hash, response_status, response_body, created_at)
    SELECT r.service, r.api_key_id, r.key, r.request_hash, r.status, r.body, now()
    FROM unnest(${0}::text[], ${1}::bigint[], ${2}::text[], ${3}::bytea[], ${4}::int[],
                ${5}::text[]) AS r(service, api_key_id, key, request_hash, status, body)
    ON CONFLICT (service, api_key_id, key) DO UPDATE
    SET response_status = excluded.response_status, response_body = excluded.response_body
), released_keys AS (
    DELETE FROM keel_idempotency_keys AS k
    USING unnest(${6}::text[], ${7}::bigint[], ${8}::text[]) AS r(service, api_key_id, key)
    WHERE k.service = r.service AND k.api_key_id = r.api_key_id AND k.key = r.key
)"""

# SQLite's BEGIN IMMEDIATE holds the database's write lock for the whole transaction, so there a
# key needs no row until its response is known: the record is written once, complete.
_SQLITE_RECORD = BulkStatement(
    insert(idempotency_keys).prefix_with("OR REPLACE"),
    [
        "service",
        "api_key_id",
        "key",
        "request_hash",
        "response_status",
        "response_body",
        "created_at",
    ],
)

Completed = tuple[IdempotentRequest, int, str]  # a claimed request, its status and body


def pg_record_ctes(first_param: int) -> str:
    """Two CTEs, ``stored_responses`` and ``released_keys``, for a caller's own statement.

    Their nine parameters are numbered from ``first_param``; :func:`pg_record_args` fills them.
    A hot path folds its key records into the statement that writes its effect this way.
    """
    numbers = [str(first_param + i) for i in range(9)]
    return _PG_RECORD_CTES.format(*numbers)


def pg_record_args(completed: list[Completed], released: list[IdempotentRequest]) -> list[Any]:
    """The nine arrays :func:`pg_record_ctes` reads: responses to store, claims to drop."""
    return [
        [req.service for req, _, _ in completed],
        [req.api_key_id for req, _, _ in completed],
        [req.key for req, _, _ in completed],
        [req.fingerprint for req, _, _ in completed],
        [status for _, status, _ in completed],
        [body for _, _, body in completed],
        [req.service for req in released],
        [req.api_key_id for req in released],
        [req.key for req in released],
    ]


class IdempotencyStore:
    """Claims and records keys set-wise, inside the caller's write transaction.

    A batch of requests costs a fixed number of statements whatever its size: one to claim
    every key, one to read the records that already existed (only when some did), and one to
    store the responses and drop the claims of refused requests.
    """

    def __init__(self, ttl: timedelta) -> None:
        self.ttl = ttl

    def claim(self, conn: Connection, req: IdempotentRequest) -> StoredResponse | None:
        """Claim one key: None to go ahead, or the response to replay; raises a refusal."""
        (outcome,) = self.claim_many(conn, [req])
        if isinstance(outcome, KeelError):
            raise outcome
        return outcome

    def claim_many(self, conn: Connection, reqs: Sequence[IdempotentRequest]) -> list[Claim]:
        """Claim every key of ``reqs`` in identity order; one outcome per request, in order.

        A key sent twice in one batch is claimed by its first copy. A later copy with another
        body is refused as reused; with the same body it is told the key is in use, which the
        caller may turn into a replay of the first copy's response once that is known.
        """
        now = datetime.now(UTC)
        firsts: dict[tuple[str, int, str], IdempotentRequest] = {}
        for req in reqs:
            firsts.setdefault(req.identity, req)
        distinct = sorted(firsts.values(), key=lambda r: r.identity)
        if conn.dialect.name == "postgresql":
            claimed = self._claim_pg(conn, distinct, now)
            rows = self._existing(conn, [r for r in distinct if r.identity not in claimed])
        else:
            rows = self._existing(conn, distinct)
            claimed = {
                r.identity
                for r in distinct
                if r.identity not in rows or self._expired(rows[r.identity], now)
            }
        return [self._outcome(req, firsts[req.identity], claimed, rows) for req in reqs]

    def complete_many(self, conn: Connection, completed: list[Completed]) -> None:
        """Store the responses of claimed requests, in the transaction of their effect."""
        if not completed:
            return
        if conn.dialect.name == "postgresql":
            self._record_pg(conn, completed, [])
            return
        now = datetime.now(UTC)
        _SQLITE_RECORD.execute(
            conn,
            [
                {
                    "service": req.service,
                    "api_key_id": req.api_key_id,
                    "key": req.key,
                    "request_hash": req.fingerprint,
                    "response_status": status,
                    "response_body": body,
                    "created_at": now,
                }
                for req, status, body in completed
            ],
        )

    def release_many(self, conn: Connection, released: list[IdempotentRequest]) -> None:
        """Forget claimed keys whose requests were refused: only successes are replayed."""
        if released and conn.dialect.name == "postgresql":
            self._record_pg(conn, [], released)
        # On SQLite a claim wrote nothing (see _SQLITE_RECORD), so there is nothing to forget.

    def complete(self, conn: Connection, req: IdempotentRequest, status: int, body: str) -> None:
        """Store one response to replay, in the same transaction as the effect."""
        self.complete_many(conn, [(req, status, body)])

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
        # The outer test is what PostgreSQL re-checks on a row it waited for: without it, a key
        # a claim took over meanwhile (fresh, its effect committed) would be deleted all the same.
        result = await conn.execute(
            delete(idempotency_keys).where(
                tuple_(k.service, k.api_key_id, k.key).in_(expired), k.created_at < cutoff
            )
        )
        return int(result.rowcount or 0)

    def _claim_pg(
        self, conn: Connection, distinct: list[IdempotentRequest], now: datetime
    ) -> set[tuple[str, int, str]]:
        rows = conn.exec_driver_sql(
            _PG_CLAIM,
            (
                [r.service for r in distinct],
                [r.api_key_id for r in distinct],
                [r.key for r in distinct],
                [r.fingerprint for r in distinct],
                now,
                now - self.ttl,
            ),
        )
        return {(service, api_key_id, key) for service, api_key_id, key in rows}

    @staticmethod
    def _record_pg(
        conn: Connection, completed: list[Completed], released: list[IdempotentRequest]
    ) -> None:
        sql = f"WITH {pg_record_ctes(1)} SELECT 1"
        conn.exec_driver_sql(sql, tuple(pg_record_args(completed, released)))

    @staticmethod
    def _existing(
        conn: Connection, reqs: list[IdempotentRequest]
    ) -> dict[tuple[str, int, str], Any]:
        """The stored records of ``reqs``' keys, read by primary key.

        One query per (service, API key), which is one per batch in practice: a row-value
        ``IN`` over all three columns would make SQLite scan the whole table.
        """
        owners: dict[tuple[str, int], list[str]] = {}
        for req in reqs:
            owners.setdefault((req.service, req.api_key_id), []).append(req.key)
        t = idempotency_keys
        found: dict[tuple[str, int, str], Any] = {}
        for (service, api_key_id), keys in owners.items():
            query = select(t).where(
                t.c.service == service, t.c.api_key_id == api_key_id, t.c.key.in_(keys)
            )
            found.update(((service, api_key_id, row.key), row) for row in conn.execute(query))
        return found

    def _expired(self, row: Any, now: datetime) -> bool:
        return bool(_as_utc(row.created_at) < now - self.ttl)

    @staticmethod
    def _outcome(
        req: IdempotentRequest,
        first: IdempotentRequest,
        claimed: set[tuple[str, int, str]],
        rows: dict[tuple[str, int, str], Any],
    ) -> Claim:
        if req.identity in claimed:
            if req is first:
                return None
            if req.fingerprint != first.fingerprint:
                return IdempotencyKeyReused(
                    "This Idempotency-Key was first used with a different request body."
                )
            return IdempotencyKeyInUse("A request with this Idempotency-Key is still running.")
        row = rows.get(req.identity)
        if row is not None and row.request_hash != req.fingerprint:
            return IdempotencyKeyReused(
                "This Idempotency-Key was first used with a different request body."
            )
        if row is None or row.response_status is None:  # unreachable while records commit whole
            return IdempotencyKeyInUse("A request with this Idempotency-Key is still running.")
        return StoredResponse(row.response_status, row.response_body)


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

    async def submit(
        self, committer: GroupCommitter[Any, Any], item: Any, req: IdempotentRequest | None
    ) -> Response:
        """Hand ``item`` to a group committer, guarded by ``req`` if the client sent a key.

        Concurrent copies of one key in this process wait for the first (and replay it); the
        committer's batch claims the key in the database, which covers every other process.
        The result is a model (answered 201) or the stored response to replay.
        """
        if req is None:
            result = await committer.submit(item)
        else:
            async with self.inflight.hold(req):
                result = await committer.submit(item)
        if isinstance(result, StoredResponse):
            return result.to_response()
        return Response(result.model_dump_json(), status_code=201, media_type="application/json")
