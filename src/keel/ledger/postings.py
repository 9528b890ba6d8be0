"""Group commit: many postings per database transaction, each still all-or-nothing on its own.

Requests hand their posting to the :class:`~keel.core.batching.GroupCommitter` built by
:func:`posting_committer` and wait. It drains whatever queued while the previous batch was
committing and applies it in one write transaction:

1. lock every account the batch touches (``SELECT … FOR UPDATE`` in id order on PostgreSQL,
   which also reserves the batch's ids; SQLite's ``BEGIN IMMEDIATE`` already holds the database's
   write lock);
2. claim the batch's idempotency keys, all in one statement and in a fixed order, after the
   account locks: two processes can then never wait on each other in opposite orders;
3. apply the postings one by one to the locked balances in memory: one that would pass its
   account's overdraft limit, or names an unknown account, is refused and leaves no trace;
4. write the accepted postings' entries, transfers, outbox events, idempotency records and final
   balances with a handful of set-based statements, and commit.

Every caller is answered only after the commit, so a 201 always means durable. Correctness never
depends on this process being the only one: the database locks are what serialise accounts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection

from keel.core.batching import GroupCommitter
from keel.core.database import Database
from keel.core.errors import IdempotencyKeyInUse, KeelError
from keel.core.idempotency import (
    IdempotencyStore,
    IdempotentRequest,
    StoredResponse,
    pg_record_args,
)
from keel.core.statements import BulkStatement, allocate_ids
from keel.core.uuid7 import uuid7_batch
from keel.ledger import pg_batch
from keel.ledger.errors import BalanceOutOfRange, InsufficientFunds, UserNotFound
from keel.ledger.schemas import Transaction, Transfer
from keel.ledger.tables import OUTBOX, entries, transfers, users

log = logging.getLogger("keel.ledger.postings")

# The batch's writes, compiled once and run through the driver's executemany.
_ENTRY_COLUMNS = [
    "id",
    "user_id",
    "amount",
    "balance_after",
    "description",
    "transfer_id",
    "created_at",
]
_INSERT_ENTRIES = BulkStatement(insert(entries), _ENTRY_COLUMNS)
_INSERT_TRANSFERS = BulkStatement(
    insert(transfers), ["id", "from_user_id", "to_user_id", "amount", "description", "created_at"]
)
_UPDATE_BALANCES = BulkStatement(
    update(users).where(users.c.id == bindparam("uid")).values(balance=bindparam("new_balance"))
)

_EVENT_TYPE = "transaction.posted"
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


@dataclass(frozen=True, slots=True)
class _Ids:
    """Primary keys set aside for the batch's new rows."""

    entries: list[int]
    transfers: list[int]


@dataclass
class _Account:
    balance: int
    overdraft_limit: int
    touched: bool = False


PostingOutcome = Transaction | Transfer | StoredResponse | KeelError


def posting_committer(
    database: Database, store: IdempotencyStore, max_batch: int
) -> GroupCommitter[Posting, Transaction | Transfer | StoredResponse]:
    """The ledger's group committer: postings in, committed results (or refusals) out."""

    def apply(conn: Connection, batch: list[Posting]) -> list[PostingOutcome]:
        for posting in batch:  # a batch rolled back by a deadlock runs again from the start
            _reset(posting)
        apply_batch(conn, store, batch)
        return [_outcome(p) for p in batch]

    return GroupCommitter(
        name="ledger_postings", database=database, apply=apply, max_batch=max_batch
    )


def _reset(posting: Posting) -> None:
    posting.replay = posting.error = posting.result = None
    posting.claimed = False
    posting.balances_after = []


def _outcome(posting: Posting) -> PostingOutcome:
    if posting.error is not None:
        return posting.error
    if posting.replay is not None:
        return posting.replay
    assert posting.result is not None
    return posting.result


def apply_batch(conn: Connection, store: IdempotencyStore, batch: list[Posting]) -> None:
    """Apply a batch inside the caller's write transaction; see the module docstring."""
    user_ids = sorted({leg.user_id for posting in batch for leg in posting.legs})
    # Ids for every posting of the batch; refused ones leave gaps on PostgreSQL, as a rollback does.
    entry_count = sum(len(posting.legs) for posting in batch)
    transfer_count = sum(posting.transfer is not None for posting in batch)
    if conn.dialect.name == "postgresql":
        locked = pg_batch.lock_and_reserve(
            conn, user_ids, entries=entry_count, transfers=transfer_count
        )
        accounts = {uid: _Account(balance, limit) for uid, balance, limit in locked.accounts}
        ids = _Ids(locked.entry_ids, locked.transfer_ids)
    else:
        accounts = _read_accounts(conn, user_ids)
        ids = _Ids(
            allocate_ids(conn, entries, entry_count), allocate_ids(conn, transfers, transfer_count)
        )
    _claim_keys(conn, store, batch)
    for posting in batch:
        if posting.accepted:
            _apply(posting, accounts)
    refused = [
        p.idempotency
        for p in batch
        if p.claimed and p.error is not None and p.idempotency is not None
    ]
    accepted = [p for p in batch if p.accepted]
    if accepted:
        _write(conn, store, accepted, accounts, ids, refused)
    else:
        store.release_many(conn, refused)
    _replay_copies(batch)


def _claim_keys(conn: Connection, store: IdempotencyStore, batch: list[Posting]) -> None:
    """Claim the batch's keys in one go; a posting whose key is not its own is settled here."""
    keyed = [p for p in batch if p.idempotency is not None]
    if not keyed:
        return
    claims = store.claim_many(conn, [p.idempotency for p in keyed if p.idempotency is not None])
    for posting, claim in zip(keyed, claims, strict=True):
        if claim is None:
            posting.claimed = True
        elif isinstance(claim, StoredResponse):
            posting.replay = claim
        else:
            posting.error = claim


def _replay_copies(batch: list[Posting]) -> None:
    """A key's later copy in the same batch gets its first copy's response, once there is one."""
    posted = {
        p.idempotency.identity: p.result
        for p in batch
        if p.claimed and p.idempotency is not None and p.result is not None
    }
    for posting in batch:
        if isinstance(posting.error, IdempotencyKeyInUse) and posting.idempotency is not None:
            result = posted.get(posting.idempotency.identity)
            if result is not None:
                posting.error = None
                posting.replay = StoredResponse(201, result.model_dump_json())


def _read_accounts(conn: Connection, user_ids: list[int]) -> dict[int, _Account]:
    """SQLite: ``BEGIN IMMEDIATE`` already holds the database's write lock, so a read will do."""
    query = select(users.c.id, users.c.balance, users.c.overdraft_limit).where(
        users.c.id.in_(user_ids)
    )
    return {row.id: _Account(row.balance, row.overdraft_limit) for row in conn.execute(query)}


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


def _write(
    conn: Connection,
    store: IdempotencyStore,
    accepted: list[Posting],
    accounts: dict[int, _Account],
    ids: _Ids,
    released: list[IdempotentRequest],
) -> None:
    """Write the accepted postings, numbered from ``ids`` (enough for them, or more).

    Their key records go with them, and the claims of the batch's refused postings are dropped.
    """
    now = datetime.now(UTC)
    moving = [p for p in accepted if p.transfer is not None]
    entry_ids = ids.entries[: sum(len(p.legs) for p in accepted)]
    transfer_ids = ids.transfers[: len(moving)]
    transfer_of = {id(p): transfer_id for p, transfer_id in zip(moving, transfer_ids, strict=True)}
    transfer_rows = [
        {
            "id": transfer_of[id(p)],
            "from_user_id": p.transfer[0],
            "to_user_id": p.transfer[1],
            "amount": p.transfer[2],
            "description": p.description,
            "created_at": now,
        }
        for p in moving
        if p.transfer is not None
    ]
    entry_rows = [
        {
            "user_id": leg.user_id,
            "amount": leg.amount,
            "balance_after": balance_after,
            "description": posting.description,
            "transfer_id": transfer_of.get(id(posting)),
            "created_at": now,
        }
        for posting in accepted
        for leg, balance_after in zip(posting.legs, posting.balances_after, strict=True)
    ]
    for row, entry_id in zip(entry_rows, entry_ids, strict=True):
        row["id"] = entry_id
    results = _build_results(accepted, entry_rows, transfer_of)
    balances = [(uid, a.balance) for uid, a in accounts.items() if a.touched]
    events = [_event(txn) for txn in _transactions(results)]
    completed = [
        (p.idempotency, 201, result.model_dump_json())
        for p, result in zip(accepted, results, strict=True)
        if p.idempotency is not None
    ]
    if conn.dialect.name == "postgresql":
        pg_batch.write_batch(
            conn,
            created_at=now,
            transfer_rows=transfer_rows,
            entry_rows=entry_rows,
            balances=balances,
            service=OUTBOX.service,
            event_type=_EVENT_TYPE,
            event_ids=uuid7_batch(len(events)),
            events=events,
            keys=pg_record_args(completed, released),
        )
    else:
        _INSERT_TRANSFERS.execute(conn, transfer_rows)
        _INSERT_ENTRIES.execute(conn, entry_rows)
        _UPDATE_BALANCES.execute(conn, [{"uid": u, "new_balance": b} for u, b in balances])
        OUTBOX.publish_many(conn, _EVENT_TYPE, events, created_at=now)
        store.complete_many(conn, completed)
        store.release_many(conn, released)
    for posting, result in zip(accepted, results, strict=True):
        posting.result = result


def _build_results(
    accepted: list[Posting], entry_rows: list[dict[str, Any]], transfer_ids: dict[int, int]
) -> list[Transaction | Transfer]:
    made = iter(Transaction(**row) for row in entry_rows)
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
    return txn.model_dump_json()
