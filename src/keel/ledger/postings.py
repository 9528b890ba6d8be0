"""Group commit: many postings per database transaction, each still all-or-nothing on its own.

Requests hand their posting to :class:`PostingBatcher` and wait. One committer task per process
drains whatever has queued while the previous batch was committing and applies it in one write
transaction:

1. lock every account the batch touches (``SELECT … FOR UPDATE`` in id order on PostgreSQL;
   SQLite's ``BEGIN IMMEDIATE`` already holds the database's write lock);
2. claim the batch's idempotency keys (after the account locks, so two processes can never wait
   on each other in opposite orders);
3. apply the postings one by one to the locked balances in memory: one that would pass its
   account's overdraft limit, or names an unknown account, is refused and leaves no trace;
4. write the accepted postings' entries, transfers, outbox events, idempotency records and final
   balances with a handful of set-based statements, and commit.

Every caller is answered only after the commit, so a 201 always means durable. Correctness never
depends on this process being the only one: the database locks are what serialise accounts.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from keel.core.database import Database
from keel.core.errors import KeelError, ServiceUnavailable
from keel.core.idempotency import IdempotencyStore, IdempotentRequest, StoredResponse
from keel.core.tables import idempotency_keys
from keel.ledger.errors import BalanceOutOfRange, InsufficientFunds, UserNotFound
from keel.ledger.schemas import Transaction, Transfer
from keel.ledger.tables import entries, outbox, transfers, users

log = logging.getLogger("keel.ledger.postings")

BALANCE_BOUND = 2**62  # far inside BIGINT, so no sum of in-range amounts can overflow


@dataclass(slots=True)
class Leg:
    """One change to one account."""

    user_id: int
    amount: int


@dataclass(eq=False)
class Posting:
    """A transaction (one leg) or a transfer (two legs): applied whole or not at all."""

    legs: list[Leg]
    description: str
    transfer: tuple[int, int, int] | None = None  # (from_user_id, to_user_id, amount)
    idempotency: IdempotentRequest | None = None
    future: asyncio.Future[Transaction | Transfer | StoredResponse] = field(init=False)
    replay: StoredResponse | None = field(default=None, init=False)
    error: KeelError | None = field(default=None, init=False)
    claimed: bool = field(default=False, init=False)
    result: Transaction | Transfer | None = field(default=None, init=False)
    balances_after: list[int] = field(default_factory=list, init=False)

    @classmethod
    def transaction(
        cls, user_id: int, amount: int, description: str, idem: IdempotentRequest | None
    ) -> Posting:
        return cls([Leg(user_id, amount)], description, None, idem)

    @classmethod
    def transfer_between(
        cls,
        from_id: int,
        to_id: int,
        amount: int,
        description: str,
        idem: IdempotentRequest | None,
    ) -> Posting:
        legs = [Leg(from_id, -amount), Leg(to_id, amount)]
        return cls(legs, description, (from_id, to_id, amount), idem)

    @property
    def accepted(self) -> bool:
        return self.replay is None and self.error is None


@dataclass
class _Account:
    balance: int
    overdraft_limit: int
    touched: bool = False


class PostingBatcher:
    """Queues postings and commits them in batches, one batch at a time per process."""

    def __init__(self, database: Database, store: IdempotencyStore, max_batch: int = 512) -> None:
        self._database = database
        self._store = store
        self._max_batch = max_batch
        self._queue: deque[Posting] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def submit(self, posting: Posting) -> Transaction | Transfer | StoredResponse:
        """Queue a posting and wait for its committed result (or its refusal)."""
        if self._closing:
            raise ServiceUnavailable("The ledger is shutting down.", headers={"Retry-After": "1"})
        posting.future = asyncio.get_running_loop().create_future()
        self._queue.append(posting)
        self._wake.set()
        return await posting.future

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="posting-batcher")

    async def stop(self) -> None:
        """Refuse new postings, commit the ones already queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = [
                    self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))
                ]
                await self._commit(batch)
            if self._closing:
                return

    async def _commit(self, batch: list[Posting]) -> None:
        try:
            async with self._database.write() as conn:
                await apply_batch(conn, self._store, batch)
        except Exception as exc:
            log.warning("posting batch of %d failed: %r", len(batch), exc)
            for posting in batch:
                _settle(posting.future, exc)
            return
        for posting in batch:
            _settle(posting.future, posting.error or posting.replay or posting.result)


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():  # the client went away; the posting still stands
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


async def apply_batch(conn: AsyncConnection, store: IdempotencyStore, batch: list[Posting]) -> None:
    """Apply a batch inside the caller's write transaction; see the module docstring."""
    accounts = await _lock_accounts(conn, batch)
    for posting in batch:
        if posting.idempotency is not None:
            try:
                posting.replay = await store.claim(conn, posting.idempotency)
            except KeelError as exc:
                posting.error = exc
            else:
                posting.claimed = posting.replay is None
    for posting in batch:
        if posting.accepted:
            _apply(posting, accounts)
    refused_claims = [p.idempotency for p in batch if p.claimed and p.error is not None]
    await _release_claims(conn, refused_claims)
    accepted = [p for p in batch if p.accepted]
    if accepted:
        await _write(conn, store, accepted, accounts)


async def _lock_accounts(conn: AsyncConnection, batch: list[Posting]) -> dict[int, _Account]:
    ids = sorted({leg.user_id for posting in batch for leg in posting.legs})
    query = (
        select(users.c.id, users.c.balance, users.c.overdraft_limit)
        .where(users.c.id.in_(ids))
        .order_by(users.c.id)
        .with_for_update()  # PostgreSQL; SQLite already holds the write lock
    )
    rows = (await conn.execute(query)).all()
    return {row.id: _Account(row.balance, row.overdraft_limit) for row in rows}


def _apply(posting: Posting, accounts: dict[int, _Account]) -> None:
    """Check every leg against the running balances; apply all of them or none."""
    after: dict[int, int] = {}
    for leg in posting.legs:
        account = accounts.get(leg.user_id)
        if account is None:
            posting.error = UserNotFound(f"No user with id {leg.user_id}.")
            return
        balance = after.get(leg.user_id, account.balance) + leg.amount
        if leg.amount < 0 and balance < -account.overdraft_limit:
            posting.error = InsufficientFunds(
                f"User {leg.user_id} has {account.balance}, overdraft limit "
                f"{account.overdraft_limit}; cannot withdraw {-leg.amount}."
            )
            return
        if balance > BALANCE_BOUND:
            posting.error = BalanceOutOfRange(
                f"User {leg.user_id}'s balance would exceed {BALANCE_BOUND}."
            )
            return
        after[leg.user_id] = balance
        posting.balances_after.append(balance)
    for user_id, balance in after.items():
        accounts[user_id].balance = balance
        accounts[user_id].touched = True


async def _release_claims(conn: AsyncConnection, claims: list[IdempotentRequest | None]) -> None:
    """Forget the keys of refused postings: only successes are replayed."""
    for req in claims:
        assert req is not None
        await conn.execute(
            delete(idempotency_keys).where(
                idempotency_keys.c.service == req.service,
                idempotency_keys.c.api_key_id == req.api_key_id,
                idempotency_keys.c.key == req.key,
            )
        )


async def _write(
    conn: AsyncConnection,
    store: IdempotencyStore,
    accepted: list[Posting],
    accounts: dict[int, _Account],
) -> None:
    now = datetime.now(UTC)
    transfer_ids = await _insert_transfers(conn, [p for p in accepted if p.transfer], now)
    entry_rows = [
        {
            "user_id": leg.user_id,
            "amount": leg.amount,
            "balance_after": balance_after,
            "description": posting.description,
            "transfer_id": transfer_ids.get(id(posting)),
            "created_at": now,
        }
        for posting in accepted
        for leg, balance_after in zip(posting.legs, posting.balances_after, strict=True)
    ]
    entry_ids = (
        (
            await conn.execute(
                insert(entries).returning(entries.c.id, sort_by_parameter_order=True), entry_rows
            )
        )
        .scalars()
        .all()
    )
    results = _build_results(accepted, entry_rows, list(entry_ids), transfer_ids)
    await conn.execute(
        update(users)
        .where(users.c.id == bindparam("uid"))
        .values(balance=bindparam("new_balance")),
        [{"uid": uid, "new_balance": a.balance} for uid, a in accounts.items() if a.touched],
    )
    await conn.execute(
        insert(outbox),
        [
            {"event_type": "transaction.posted", "payload": _event(txn), "created_at": now}
            for txn in _transactions(results)
        ],
    )
    for posting, result in zip(accepted, results, strict=True):
        posting.result = result
        if posting.idempotency is not None:
            await store.complete(conn, posting.idempotency, 201, result.model_dump_json())


async def _insert_transfers(
    conn: AsyncConnection, postings: list[Posting], now: datetime
) -> dict[int, int]:
    if not postings:
        return {}
    rows = [
        {
            "from_user_id": p.transfer[0],
            "to_user_id": p.transfer[1],
            "amount": p.transfer[2],
            "description": p.description,
            "created_at": now,
        }
        for p in postings
        if p.transfer is not None
    ]
    ids = (
        (
            await conn.execute(
                insert(transfers).returning(transfers.c.id, sort_by_parameter_order=True), rows
            )
        )
        .scalars()
        .all()
    )
    return {id(p): transfer_id for p, transfer_id in zip(postings, ids, strict=True)}


def _build_results(
    accepted: list[Posting],
    entry_rows: list[dict[str, Any]],
    entry_ids: list[int],
    transfer_ids: dict[int, int],
) -> list[Transaction | Transfer]:
    made = iter(
        Transaction(id=entry_id, **{k: v for k, v in row.items()})
        for row, entry_id in zip(entry_rows, entry_ids, strict=True)
    )
    results: list[Transaction | Transfer] = []
    for posting in accepted:
        legs = [next(made) for _ in posting.legs]
        if posting.transfer is None:
            results.append(legs[0])
            continue
        from_id, to_id, amount = posting.transfer
        results.append(
            Transfer(
                id=transfer_ids[id(posting)],
                from_user_id=from_id,
                to_user_id=to_id,
                amount=amount,
                description=posting.description,
                created_at=legs[0].created_at,
                entries=legs,
            )
        )
    return results


def _transactions(results: list[Transaction | Transfer]) -> list[Transaction]:
    out: list[Transaction] = []
    for result in results:
        out.extend(result.entries if isinstance(result, Transfer) else [result])
    return out


def _event(txn: Transaction) -> str:
    return json.dumps({"type": "transaction.posted", "data": txn.model_dump(mode="json")})
