"""The outbox worker's SQL: dispatching events, leasing deliveries, recording what happened.

Every function takes the caller's connection; :class:`keel.ledger.outbox.OutboxWorker` owns the
transactions. Claims are single conditional statements (``UPDATE … WHERE <still claimable> …
RETURNING``), atomic on SQLite (under ``BEGIN IMMEDIATE``) and on PostgreSQL (where the inner
``FOR UPDATE SKIP LOCKED`` lets concurrent workers take different rows instead of queueing).
Times come from the worker's clock, so hosts sharing a database need NTP-synchronised clocks; a
lease is a minute by default, so a second of skew does not matter.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Select, and_, delete, exists, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from keel.core.schemas import Page, keyset_page
from keel.ledger.schemas import Delivery
from keel.ledger.settings import LedgerSettings
from keel.ledger.tables import deliveries, outbox

DeliveryState = Literal["pending", "delivered", "failed"]
PENDING: DeliveryState = "pending"
DELIVERED: DeliveryState = "delivered"
FAILED: DeliveryState = "failed"
_MAX_ERROR = 500  # ledger_webhook_deliveries.last_error is String(500)


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A delivery the caller holds the lease on, with the exact bytes it will POST."""

    id: int
    event_id: int
    url: str
    attempt: int  # 1-based; also the lease's token, since a reclaim raises it
    body: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one POST came to: a status, or an error when no response arrived."""

    delivery: ClaimedDelivery
    status: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def retry_delay(
    attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (exponential, equal jitter)."""
    step = min(base * 2.0 ** min(attempt - 1, 60), cap)
    # Half fixed, half random: the wait still grows every time, while the retries of many
    # deliveries that failed together (a receiver outage) spread out instead of arriving in waves.
    return step / 2 + rand() * step / 2


def event_body(event_id: int, event_type: str, payload: str, created_at: datetime) -> bytes:
    """The JSON a receiver gets, ``{id, type, created_at, data}``, the same bytes every attempt."""
    envelope = {
        "id": event_id,
        "type": event_type,
        "created_at": created_at.isoformat().replace("+00:00", "Z"),
        "data": json.loads(payload).get("data"),
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


async def dispatch_events(
    conn: AsyncConnection, urls: Sequence[str], limit: int, now: datetime
) -> int:
    """Turn up to ``limit`` of the oldest undispatched events into pending deliveries."""
    oldest = (
        select(outbox.c.id)
        .where(outbox.c.dispatched_at.is_(None))
        .order_by(outbox.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    claimed = await conn.execute(
        update(outbox)
        .where(outbox.c.id.in_(oldest), outbox.c.dispatched_at.is_(None))
        .values(dispatched_at=now)
        .returning(outbox.c.id)
    )
    event_ids = sorted(claimed.scalars().all())
    if event_ids and urls:
        await conn.execute(
            deliveries.insert(),
            [
                {
                    "event_id": event_id,
                    "url": url,
                    "state": PENDING,
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
                for event_id in event_ids
                for url in urls
            ],
        )
    return len(event_ids)


def _unleased(now: datetime) -> ColumnElement[bool]:
    return or_(deliveries.c.lease_until.is_(None), deliveries.c.lease_until < now)


def _due(now: datetime) -> ColumnElement[bool]:
    return and_(deliveries.c.state == PENDING, deliveries.c.next_attempt_at <= now, _unleased(now))


def has_work(now: datetime) -> Select[bool, bool]:
    """A cheap read that lets an idle worker skip write transactions (and SQLite's write lock)."""
    return select(
        exists().where(outbox.c.dispatched_at.is_(None)).label("events"),
        exists().where(_due(now)).label("deliveries"),
    )


async def claim_due_deliveries(
    conn: AsyncConnection, *, now: datetime, lease_seconds: float, limit: int, max_attempts: int
) -> list[ClaimedDelivery]:
    """Lease up to ``limit`` due deliveries to the caller; rows leased by others are skipped."""
    due = (
        select(deliveries.c.id)
        .where(_due(now), deliveries.c.attempts < max_attempts)
        .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    # The outer WHERE repeats the test because it, not the subquery's snapshot, is what
    # PostgreSQL re-checks on the locked row: that is what makes the claim exclusive.
    rows = (
        await conn.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(due), deliveries.c.state == PENDING, _unleased(now))
            .values(
                lease_until=now + timedelta(seconds=lease_seconds),
                attempts=deliveries.c.attempts + 1,
            )
            .returning(
                deliveries.c.id, deliveries.c.event_id, deliveries.c.url, deliveries.c.attempts
            )
        )
    ).all()
    if not rows:
        return []
    events = {
        event.id: event
        for event in await conn.execute(
            select(outbox.c.id, outbox.c.event_type, outbox.c.payload, outbox.c.created_at).where(
                outbox.c.id.in_({row.event_id for row in rows})
            )
        )
    }
    claimed = []
    for row in sorted(rows, key=lambda r: int(r.id)):
        event = events[row.event_id]
        body = event_body(event.id, event.event_type, event.payload, event.created_at)
        claimed.append(ClaimedDelivery(row.id, row.event_id, row.url, row.attempts, body))
    return claimed


async def give_up_exhausted(conn: AsyncConnection, now: datetime, max_attempts: int) -> int:
    """Fail unleased pending deliveries that have no attempts left; returns how many."""
    # Reached only when the last attempt never reported (its worker died or was stopped) or
    # webhook_max_attempts was lowered: a normal last failure is marked failed when recorded.
    result = await conn.execute(
        update(deliveries)
        .where(
            deliveries.c.state == PENDING,
            deliveries.c.attempts >= max_attempts,
            _unleased(now),
        )
        .values(
            state=FAILED,
            lease_until=None,
            last_error="no attempts left; the last one was interrupted before it reported",
        )
    )
    return int(result.rowcount)


async def record_outcomes(
    conn: AsyncConnection, outcomes: Sequence[Outcome], *, now: datetime, settings: LedgerSettings
) -> list[str]:
    """Store each outcome and drop its lease; returns each one's label for the metrics."""
    labels = []
    for outcome in outcomes:
        claimed = outcome.delivery
        this_row = and_(deliveries.c.id == claimed.id, deliveries.c.state == PENDING)
        if outcome.ok:
            # Recorded even if the lease has passed to another worker: the receiver has it.
            values: dict[str, Any] = {"state": DELIVERED, "delivered_at": now, "last_error": None}
            label = "delivered"
        else:
            # Only the current lease holder may count a failure; a stale one would double count.
            this_row = and_(this_row, deliveries.c.attempts == claimed.attempt)
            exhausted = claimed.attempt >= settings.webhook_max_attempts
            delay = retry_delay(
                claimed.attempt,
                settings.webhook_backoff_base_seconds,
                settings.webhook_backoff_max_seconds,
            )
            values = {
                "state": FAILED if exhausted else PENDING,
                "last_error": (outcome.error or "")[:_MAX_ERROR],
                "next_attempt_at": now if exhausted else now + timedelta(seconds=delay),
            }
            label = "failed" if exhausted else "retrying"
        result = await conn.execute(
            update(deliveries)
            .where(this_row)
            .values(last_status=outcome.status, lease_until=None, **values)
        )
        labels.append(label if result.rowcount else "stale")
    return labels


async def release_leases(conn: AsyncConnection, interrupted: Sequence[ClaimedDelivery]) -> None:
    """Hand deliveries cut off by shutdown to the next worker now rather than at lease end."""
    for claimed in interrupted:
        await conn.execute(
            update(deliveries)
            .where(
                deliveries.c.id == claimed.id,
                deliveries.c.state == PENDING,
                deliveries.c.attempts == claimed.attempt,
            )
            .values(lease_until=None, last_error="interrupted: the worker stopped mid-request")
        )


HEALTH_COUNT_CAP = 10_000


def _count_upto(condition: Any, table: Any) -> Any:
    """How many rows match, counting no further than ``HEALTH_COUNT_CAP``.

    /health is polled often; an exact count of a large backlog (or of every delivery that ever
    failed) costs time proportional to its size, at the moment the database has least to spare.
    """
    capped = select(literal(1)).select_from(table).where(condition).limit(HEALTH_COUNT_CAP)
    return select(func.count()).select_from(capped.subquery()).scalar_subquery()


async def outbox_summary(conn: AsyncConnection, now: datetime) -> dict[str, Any]:
    """Backlog counts (capped) and the age of the oldest event not yet delivered, for /health."""
    undispatched = outbox.c.dispatched_at.is_(None)
    pending_events = deliveries.join(outbox, outbox.c.id == deliveries.c.event_id)
    row = (
        await conn.execute(
            select(
                _count_upto(undispatched, outbox),
                _count_upto(deliveries.c.state == PENDING, deliveries),
                _count_upto(deliveries.c.state == FAILED, deliveries),
                # The oldest by id, through the indexes, rather than min() over the backlog.
                select(outbox.c.created_at)
                .where(undispatched)
                .order_by(outbox.c.id)
                .limit(1)
                .scalar_subquery(),
                select(outbox.c.created_at)
                .select_from(pending_events)
                .where(deliveries.c.state == PENDING)
                .order_by(deliveries.c.id)
                .limit(1)
                .scalar_subquery(),
            )
        )
    ).one()
    undispatched_events, pending, failed, *oldest = row
    ages = [(now - created_at).total_seconds() for created_at in oldest if created_at is not None]
    return {
        "undispatched_events": undispatched_events,
        "pending_deliveries": pending,
        "failed_deliveries": failed,
        "counts_capped_at": HEALTH_COUNT_CAP,
        "oldest_pending_age_seconds": round(max([0.0, *ages]), 3),
    }


async def list_deliveries(
    conn: AsyncConnection,
    *,
    state: DeliveryState | None,
    event_id: int | None,
    limit: int,
    before_id: int | None,
) -> Page[Delivery]:
    """Deliveries, newest first, optionally of one state or one event."""
    query = select(
        deliveries.c.id,
        deliveries.c.event_id,
        deliveries.c.url,
        deliveries.c.state,
        deliveries.c.attempts,
        deliveries.c.next_attempt_at,
        deliveries.c.last_status,
        deliveries.c.last_error,
        deliveries.c.delivered_at,
        deliveries.c.created_at,
    )
    if state is not None:
        query = query.where(deliveries.c.state == state)
    if event_id is not None:
        query = query.where(deliveries.c.event_id == event_id)
    if before_id is not None:
        query = query.where(deliveries.c.id < before_id)
    rows = (await conn.execute(query.order_by(deliveries.c.id.desc()).limit(limit + 1))).all()
    return keyset_page(rows, limit, Delivery)


async def purge_settled(conn: AsyncConnection, before: datetime) -> tuple[int, int]:
    """Delete deliveries delivered before ``before`` and events with nothing left to deliver.

    Failed deliveries stay until someone looks at them; so do their events.
    """
    gone = await conn.execute(
        delete(deliveries).where(
            deliveries.c.state == "delivered", deliveries.c.delivered_at < before
        )
    )
    still_owed = select(deliveries.c.id).where(deliveries.c.event_id == outbox.c.id).exists()
    events_gone = await conn.execute(
        delete(outbox).where(outbox.c.dispatched_at < before, ~still_owed)
    )
    return int(gone.rowcount or 0), int(events_gone.rowcount or 0)
