"""Reading the ledger's state straight from its database, for tests that must not trust replies."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from keel.core.auth import Scope, create_api_key
from keel.core.database import Database, create_engine
from keel.core.outbox.tables import events as outbox
from keel.core.tables import idempotency_keys
from keel.ledger.tables import entries, transfers, users

COUNTED_TABLES = {
    "users": users,
    "entries": entries,
    "transfers": transfers,
    "outbox": outbox,
    "idempotency_keys": idempotency_keys,
}


async def create_key(database_url: str, scope: Scope = Scope.ADMIN) -> str:
    """A new API key stored in the database at ``database_url``."""
    database = Database(create_engine(database_url))
    try:
        async with database.write() as conn:
            return await create_api_key(conn, scope=scope, name="test")
    finally:
        await database.dispose()


async def row_counts(database: Database) -> dict[str, int]:
    """How many rows each table the ledger writes holds."""
    async with database.read() as conn:
        return {
            name: (await conn.execute(select(func.count()).select_from(table))).scalar_one()
            for name, table in COUNTED_TABLES.items()
        }


@dataclass
class Account:
    id: int
    balance: int
    overdraft_limit: int
    entries: list[Any]  # rows of ledger_entries, oldest first

    @property
    def entries_sum(self) -> int:
        return sum(e.amount for e in self.entries)


async def accounts(database: Database, user_ids: Iterable[int]) -> dict[int, Account]:
    """Each account's stored balance and its entries, read in one snapshot."""
    ids = sorted(set(user_ids))
    async with database.read() as conn:
        user_rows = (
            await conn.execute(
                select(users.c.id, users.c.balance, users.c.overdraft_limit).where(
                    users.c.id.in_(ids)
                )
            )
        ).all()
        entry_rows = (
            await conn.execute(
                select(entries).where(entries.c.user_id.in_(ids)).order_by(entries.c.id)
            )
        ).all()
    found = {row.id: Account(row.id, row.balance, row.overdraft_limit, []) for row in user_rows}
    for row in entry_rows:
        found[row.user_id].entries.append(row)
    return found


def assert_consistent(account: Account) -> None:
    """Balance equals the sum of the entries, and replaying them never crosses the overdraft.

    Entry ids grow in commit order per account (the rows are written under the account's lock),
    so each entry's balance_after must be the previous one plus its amount: a lost update or
    a double-applied posting would break the chain.
    """
    assert account.balance == account.entries_sum, account
    running = 0
    for entry in account.entries:
        running += entry.amount
        assert entry.balance_after == running, (account.id, entry)
        assert running >= -account.overdraft_limit, (account.id, entry)


async def outbox_events_by_entry(database: Database) -> dict[int, list[dict[str, Any]]]:
    """Every outbox event's data, keyed by the entry id it announces."""
    async with database.read() as conn:
        rows = (
            await conn.execute(
                select(outbox.c.event_type, outbox.c.payload).where(outbox.c.service == "ledger")
            )
        ).all()
    by_entry: dict[int, list[dict[str, Any]]] = {}
    for event_type, payload in rows:
        data = json.loads(payload)
        by_entry.setdefault(data["id"], []).append({"type": event_type, "data": data})
    return by_entry
