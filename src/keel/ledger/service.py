"""The ledger's rules for users, history and audit. Postings live in :mod:`keel.ledger.postings`.

Every function takes the caller's connection: the route (or CLI command) owns the transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import bindparam, func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from keel.core.schemas import Page, keyset_page
from keel.core.statements import Lookup
from keel.ledger.errors import UsernameTaken, UserNotFound
from keel.ledger.schemas import AccountAudit, AuditReport, Transaction, User, UserCreate
from keel.ledger.tables import entries, users

_USER_COLUMNS = (
    users.c.id,
    users.c.username,
    users.c.email,
    users.c.balance,
    users.c.overdraft_limit,
    users.c.created_at,
)


async def create_user(conn: AsyncConnection, data: UserCreate) -> User:
    """Open an account with a zero balance; 409 if the username is taken."""
    created_at = datetime.now(UTC)
    try:
        user_id = (
            await conn.execute(
                insert(users)
                .values(
                    username=data.username,
                    email=data.email,
                    overdraft_limit=data.overdraft_limit,
                    created_at=created_at,
                    balance=0,
                )
                .returning(users.c.id)
            )
        ).scalar_one()
    except IntegrityError as exc:  # the caller's transaction rolls back, idempotency claim too
        if _violates_unique_username(exc):
            raise UsernameTaken(f"The username {data.username!r} is taken.") from None
        raise  # any other violation is a bug, not a taken name: reported as such (500)
    return User(id=user_id, balance=0, created_at=created_at, **data.model_dump())


_UNIQUE_USERNAME = "uq_ledger_users_username"


def _violates_unique_username(exc: IntegrityError) -> bool:
    """Whether ``exc`` is the username's unique constraint, as each engine reports it.

    PostgreSQL names the constraint (asyncpg's ``constraint_name``, the cause of SQLAlchemy's
    wrapper); SQLite names only the column, in its message.
    """
    name = getattr(exc.orig.__cause__ if exc.orig else None, "constraint_name", None)
    if name is not None:
        return bool(name == _UNIQUE_USERNAME)
    return f"UNIQUE constraint failed: {users.name}.username" in str(exc.orig)


# Compiled once and run on the driver: the hot path of GET /users/{id}.
_GET_USER = Lookup(select(*_USER_COLUMNS).where(users.c.id == bindparam("user_id")))


def get_user(conn: Connection, user_id: int) -> User:
    """One account; synchronous so hot paths can run it without a thread hop (Database.run_read)."""
    row = _GET_USER.first(conn, user_id=user_id)
    if row is None:
        raise UserNotFound(f"No user with id {user_id}.")
    return User.model_validate(row)


async def search_users(
    conn: AsyncConnection, q: str, limit: int, after_id: int | None
) -> Page[User]:
    """Users whose username contains ``q``, ignoring case; ``%``, ``_`` and ``\\`` are literal."""
    query = select(*_USER_COLUMNS).where(users.c.username.icontains(q, autoescape=True))
    if after_id is not None:
        query = query.where(users.c.id > after_id)
    rows = (await conn.execute(query.order_by(users.c.id).limit(limit + 1))).all()
    return keyset_page(rows, limit, User)


async def list_transactions(
    conn: AsyncConnection, user_id: int, limit: int, before_id: int | None
) -> Page[Transaction]:
    """A user's entries, newest first."""
    await conn.run_sync(get_user, user_id)
    query = select(
        entries.c.id,
        entries.c.user_id,
        entries.c.amount,
        entries.c.balance_after,
        entries.c.description,
        entries.c.transfer_id,
        entries.c.created_at,
    ).where(entries.c.user_id == user_id)
    if before_id is not None:
        query = query.where(entries.c.id < before_id)
    rows = (await conn.execute(query.order_by(entries.c.id.desc()).limit(limit + 1))).all()
    return keyset_page(rows, limit, Transaction)


async def audit(conn: AsyncConnection) -> AuditReport:
    """Check every account's balance against the sum of its entries."""
    sums = (
        select(
            entries.c.user_id,
            func.coalesce(func.sum(entries.c.amount), 0).label("total"),
            func.count().label("n"),
        )
        .group_by(entries.c.user_id)
        .subquery()
    )
    rows = (
        await conn.execute(
            select(users.c.id, users.c.balance, sums.c.total, sums.c.n)
            .select_from(users.outerjoin(sums, sums.c.user_id == users.c.id))
            .order_by(users.c.id)
        )
    ).all()
    mismatches = []
    for row in rows:
        total, count = int(row.total or 0), int(row.n or 0)
        if total != row.balance:
            mismatches.append(
                AccountAudit(
                    user_id=row.id, balance=row.balance, entries_sum=total, entries=count, ok=False
                )
            )
    return AuditReport(
        ok=not mismatches,
        accounts_checked=len(rows),
        mismatches=mismatches,
        checked_at=datetime.now(UTC),
    )
