"""POST /users reports a taken username as 409 ``username_taken``, and only that."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from keel.core.database import Database
from keel.ledger import service
from keel.ledger.errors import UsernameTaken
from keel.ledger.schemas import UserCreate
from tests.ledger.helpers import unique


async def test_a_taken_username_is_username_taken(database: Database) -> None:
    name = unique()
    async with database.write() as conn:
        await service.create_user(conn, UserCreate(username=name))
    with pytest.raises(UsernameTaken):
        async with database.write() as conn:
            await service.create_user(conn, UserCreate(username=name))


async def test_another_constraint_violation_is_not_reported_as_a_taken_username(
    database: Database,
) -> None:
    # The schema keeps overdraft_limit >= 0; bypass it to reach the table's check constraint,
    # as a future rule or a bug would.
    data = UserCreate.model_construct(username=unique(), email=None, overdraft_limit=-1)
    with pytest.raises(IntegrityError) as raised:
        async with database.write() as conn:
            await service.create_user(conn, data)
    assert "ck_ledger_users_" in str(raised.value.orig)  # a check constraint, named
    async with database.read() as conn:
        page = await service.search_users(conn, data.username, 1, None)
    assert page.items == []
