"""ledger_0003 moves an existing ledger's outbox into the core tables, giving old events UUIDs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from keel.core.chains import CORE_CHAIN
from keel.core.database import Database, create_engine
from keel.core.migrate import alembic_config, upgrade
from keel.core.outbox import Outbox
from keel.core.outbox.tables import deliveries, events
from keel.ledger.registration import MIGRATIONS
from tests import backends

OLD_HEADS = {"core": "core_0001", "ledger": "ledger_0002"}  # before the outbox moved
T0 = datetime(2026, 11, 1, 12, 0, 0, 123000, tzinfo=UTC)


@pytest.fixture
async def old_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of this test's own."""
    if backend == "postgres":
        url = await backends.create_postgres_database()
        yield url
        await backends.drop_postgres_database(url)
    else:
        yield f"sqlite:///{tmp_path / 'old.db'}"


def _to(conn: Connection, heads: dict[str, str]) -> None:
    chains = {"core": CORE_CHAIN, "ledger": MIGRATIONS}
    for chain, revision in heads.items():
        command.upgrade(alembic_config(chains[chain], conn), revision)


async def _publish_and_deliver(conn: AsyncConnection, n: int) -> tuple[int, int]:
    """Publish one event after the move and give it a delivery: their new internal ids."""
    fresh = await Outbox("ledger", ["transaction.posted"]).publish_async(
        conn, "transaction.posted", {"id": n}
    )
    fresh_id = (
        await conn.execute(select(events.c.id).where(events.c.event_id == fresh))
    ).scalar_one()
    delivery_id = (
        await conn.execute(
            deliveries.insert()
            .values(
                service="ledger",
                event_id=fresh_id,
                url="https://a.test/",
                state="pending",
                next_attempt_at=T0,
                created_at=T0,
            )
            .returning(deliveries.c.id)
        )
    ).scalar_one()
    return int(fresh_id), int(delivery_id)


_DATES = ("created_at", "dispatched_at", "next_attempt_at", "delivered_at")


def _table(name: str, *columns: str) -> Any:
    return sa.table(
        name, *(sa.column(c, sa.DateTime(timezone=True) if c in _DATES else None) for c in columns)
    )


def _old_rows(conn: Connection) -> None:
    """What a ledger at ledger_0002 held: three events, and deliveries of two of them."""
    old_outbox = _table("ledger_outbox", "id", "event_type", "payload", *_DATES[:2])
    conn.execute(
        old_outbox.insert(),
        [
            {
                "id": i,
                "event_type": "transaction.posted",
                "payload": json.dumps({"type": "transaction.posted", "data": {"id": 100 + i}}),
                "created_at": T0 + timedelta(seconds=i),
                "dispatched_at": T0 + timedelta(seconds=i) if i < 3 else None,
            }
            for i in (1, 2, 3)
        ],
    )
    old_deliveries = _table(
        "ledger_webhook_deliveries",
        *("id", "event_id", "url", "state", "attempts", "last_status"),
        *("next_attempt_at", "delivered_at", "created_at"),
    )
    rows = [
        (7, 1, "https://a.test/", "delivered", 1, 204, T0),
        (8, 2, "https://a.test/", "pending", 3, 500, None),
        (9, 2, "https://b.test/", "failed", 12, 503, None),
    ]
    conn.execute(
        old_deliveries.insert(),
        [
            {
                "id": id_,
                "event_id": event_id,
                "url": url,
                "state": state,
                "attempts": attempts,
                "last_status": status,
                "delivered_at": delivered,
                "next_attempt_at": T0,
                "created_at": T0,
            }
            for id_, event_id, url, state, attempts, status, delivered in rows
        ],
    )


async def test_an_existing_ledger_outbox_moves_into_the_core(old_url: str) -> None:
    database = Database(create_engine(old_url))
    try:
        async with database.write() as conn:
            await conn.run_sync(_to, OLD_HEADS)
            await conn.run_sync(_old_rows)
            # Another service on the same database reached core_0002 and published first.
            await conn.run_sync(_to, {"core": "core_0002"})
            other = await Outbox("other", ["x.y"]).publish_async(conn, "x.y", {"id": 1})
        await upgrade(old_url, [MIGRATIONS])
        async with database.read() as conn:
            moved = (
                await conn.execute(
                    select(events).where(events.c.service == "ledger").order_by(events.c.id)
                )
            ).all()
            sent = (
                await conn.execute(
                    select(deliveries, events.c.payload)
                    .join(events, events.c.id == deliveries.c.event_id)
                    .order_by(deliveries.c.id)
                )
            ).all()
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            other_id = (
                await conn.execute(select(events.c.id).where(events.c.event_id == other))
            ).scalar_one()
        assert "ledger_outbox" not in tables and "ledger_webhook_deliveries" not in tables
        assert [json.loads(e.payload) for e in moved] == [{"id": 101}, {"id": 102}, {"id": 103}]
        assert [e.dispatched_at is None for e in moved] == [False, False, True]
        assert all(e.id > other_id for e in moved)  # shifted past the other service's rows
        for i, event in enumerate(moved, start=1):  # UUIDv7 stamped with the event's own time
            assert event.event_id.version == 7
            assert event.event_id.int >> 80 == int((T0 + timedelta(seconds=i)).timestamp() * 1000)
        assert len({e.event_id for e in moved}) == 3
        assert [(d.service, d.url, d.state, d.attempts, d.last_status) for d in sent] == [
            ("ledger", "https://a.test/", "delivered", 1, 204),
            ("ledger", "https://a.test/", "pending", 3, 500),
            ("ledger", "https://b.test/", "failed", 12, 503),
        ]
        assert [json.loads(d.payload)["id"] for d in sent] == [101, 102, 102]
        # New rows continue after the copied ones on both engines (PostgreSQL's sequences moved).
        async with database.write() as conn:
            fresh_id, delivery_id = await _publish_and_deliver(conn, 104)
        assert fresh_id > max(e.id for e in moved)
        assert delivery_id > max(d.id for d in sent)
    finally:
        await database.dispose()


async def test_no_id_handed_out_before_the_move_is_handed_out_again(
    backend: str, old_url: str
) -> None:
    """Sequences (and SQLite's AUTOINCREMENT) remember ids whose rows were purged: so must the move.

    The ledger's newest events and deliveries were purged, and another service published to the
    core tables, then had its events purged too: no copied or new row may take any of their ids.
    (The ledger's old SQLite tables kept no record of ids past their largest: there, 4 and 5
    could already be handed out again before the move.)
    """
    old_top = 5 if backend == "postgres" else 3
    database = Database(create_engine(old_url))
    old_outbox = _table("ledger_outbox", "event_type", "payload", "created_at")
    old_deliveries = _table(
        "ledger_webhook_deliveries", "event_id", "url", "state", "next_attempt_at", "created_at"
    )
    try:
        async with database.write() as conn:
            await conn.run_sync(_to, OLD_HEADS)
            for i in range(1, 6):  # ids 1..5 from the old tables' sequences
                await conn.execute(
                    old_outbox.insert().values(
                        event_type="transaction.posted",
                        payload=json.dumps({"type": "transaction.posted", "data": {"id": i}}),
                        created_at=T0,
                    )
                )
                await conn.execute(
                    old_deliveries.insert().values(
                        event_id=i,
                        url="https://a.test/",
                        state="delivered",
                        next_attempt_at=T0,
                        created_at=T0,
                    )
                )
            await conn.execute(sa.text("DELETE FROM ledger_webhook_deliveries WHERE id > 3"))
            await conn.execute(sa.text("DELETE FROM ledger_outbox WHERE id > 3"))
            await conn.run_sync(_to, {"core": "core_0002"})
            for i in range(3):
                await Outbox("other", ["x.y"]).publish_async(conn, "x.y", {"id": i})
            await conn.execute(sa.text("DELETE FROM keel_outbox_events"))  # purged
        await upgrade(old_url, [MIGRATIONS])
        async with database.write() as conn:
            moved = (await conn.execute(select(events.c.id))).scalars().all()
            fresh_id, delivery_id = await _publish_and_deliver(conn, 6)
        assert min(moved) > 3  # the other service's purged events had ids 1..3
        assert fresh_id > 3 + old_top  # nor the ledger's purged ones, wherever the move put them
        assert delivery_id > old_top  # 4 and 5 went out as Keel-Delivery-Id before the move
    finally:
        await database.dispose()
