"""A batch the store refuses for good (a SQLSTATE outside class 22) must not block the stream.

On a PostgreSQL of the test's own, with a CHECK constraint that refuses one user's events: the
writer retries a few times, then dead-letters the refused event with the store's reason, stores
the rest, and acknowledges the entries, so Redis holds nothing of them any more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from sqlalchemy import select

from keel.core.database import Database, create_engine
from keel.firehose.buffers.redis import RedisBuffer
from keel.firehose.registration import MIGRATIONS
from keel.firehose.tables import dead_letters
from tests.firehose.load import rows, store_counts, until
from tests.firehose.redis_support import drop_stream, redis_settings, stream_state, unique_stream
from tests.support.own_postgres import OwnPostgres, migrated_own_postgres

pytestmark = pytest.mark.slow


@pytest.fixture
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    async with migrated_own_postgres([MIGRATIONS]) as server:
        yield server


async def test_a_batch_refused_for_good_is_dead_lettered_and_acknowledged(
    own_postgres: OwnPostgres, redis_url: str
) -> None:
    database = Database(create_engine(own_postgres.url))
    async with database.write() as conn:  # 23514 check_violation: not a data exception (22)
        await conn.exec_driver_sql(
            "ALTER TABLE firehose_events ADD CONSTRAINT no_poison CHECK (user_id <> 'poison')"
        )
    stream = unique_stream()
    buffer = RedisBuffer(database, redis_settings(own_postgres.url, redis_url, stream))
    raw = aioredis.from_url(redis_url)
    good, poison = rows(5), rows(1, user="poison")
    try:
        await buffer.start()
        await buffer.append(good + poison)

        async def settled() -> bool:
            state = await stream_state(raw, stream)
            return state == {"entries": 0, "depth": 0, "pending": 0}

        await until(settled, 20, "the refused batch to be dead-lettered and acknowledged")
        assert set((await store_counts(database, [r.event_id for r in good])).values()) == {1}
        async with database.read() as conn:
            letters = (await conn.execute(select(dead_letters))).all()
        assert [letter.event_id for letter in letters] == [poison[0].event_id]
        assert letters[0].reason.startswith("23514"), letters[0].reason
    finally:
        await buffer.stop()
        await raw.aclose()
        await drop_stream(redis_url, stream)
        await database.dispose()
