"""The outbox worker's SQL: dispatching events, leasing deliveries, recording what happened.

Every function takes the caller's connection; :class:`keel.core.outbox.worker.OutboxWorker` owns
the transactions, and every statement is limited to one service's rows. Claims are single
conditional statements (``UPDATE … WHERE <still claimable> … RETURNING``), atomic on SQLite
(under ``BEGIN IMMEDIATE``) and on PostgreSQL (where the inner ``FOR UPDATE SKIP LOCKED`` lets
concurrent workers take different rows instead of queueing).
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
from uuid import UUID

from sqlalchemy import Select, and_, delete, exists, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from keel.core.outbox.schemas import Delivery
from keel.core.outbox.settings import WebhookSettings
from keel.core.outbox.tables import deliveries
from keel.core.outbox.tables import events as outbox
from keel.core.schemas import Page, keyset_page

DeliveryState = Literal["pending", "delivered", "failed"]
PENDING: DeliveryState = "pending"
DELIVERED: DeliveryState = "delivered"
FAILED: DeliveryState = "failed"
_MAX_ERROR = 500  # keel_webhook_deliveries.last_error is String(500)


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A delivery the caller holds the lease on, with the exact bytes it will POST."""

    id: int
    event_id: UUID  # the public id; the row's own integer id stays internal
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


def event_body(event_id: UUID, event_type: str, payload: str, created_at: datetime) -> bytes:
    """The JSON a receiver gets, ``{id, type, created_at, data}``, the same bytes every attempt."""
    envelope = {
        "id": str(event_id),
        "type": event_type,
        "created_at": created_at.isoformat().replace("+00:00", "Z"),
        "data": json.loads(payload),
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


async def dispatch_events(
    conn: AsyncConnection, service: str, urls: Sequence[str], limit: int, now: datetime
) -> int:
    """Turn up to ``limit`` of the service's oldest undispatched events into pending deliveries."""
    oldest = (
        select(outbox.c.id)
        .where(outbox.c.service == service, outbox.c.dispatched_at.is_(None))
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
                    "service": service,
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


def _due(service: str, now: datetime) -> ColumnElement[bool]:
    return and_(
        deliveries.c.service == service,
        deliveries.c.state == PENDING,
        deliveries.c.next_attempt_at <= now,
        _unleased(now),
    )


def has_work(service: str, now: datetime) -> Select[bool, bool]:
    """A cheap read that lets an idle worker skip write transactions (and SQLite's write lock)."""
    return select(
        exists()
        .where(outbox.c.service == service, outbox.c.dispatched_at.is_(None))
        .label("events"),
        exists().where(_due(service, now)).label("deliveries"),
    )


async def claim_due_deliveries(
    conn: AsyncConnection,
    service: str,
    *,
    now: datetime,
    lease_seconds: float,
    limit: int,
    max_attempts: int,
) -> list[ClaimedDelivery]:
    """Lease up to ``limit`` due deliveries to the caller; rows leased by others are skipped."""
    due = (
        select(deliveries.c.id)
        .where(_due(service, now), deliveries.c.attempts < max_attempts)
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
    columns = (outbox.c.id, outbox.c.event_id, outbox.c.event_type, outbox.c.payload)
    events = {
        event.id: event
        for event in await conn.execute(
            select(*columns, outbox.c.created_at).where(
                outbox.c.id.in_({row.event_id for row in rows})
            )
        )
    }
    claimed = []
    for row in sorted(rows, key=lambda r: int(r.id)):
        event = events[row.event_id]
        body = event_body(event.event_id, event.event_type, event.payload, event.created_at)
        claimed.append(ClaimedDelivery(row.id, event.event_id, row.url, row.attempts, body))
    return claimed


async def give_up_exhausted(
    conn: AsyncConnection, service: str, now: datetime, max_attempts: int
) -> int:
    """Fail unleased pending deliveries that have no attempts left; returns how many."""
    # Reached only when the last attempt never reported (its worker died or was stopped) or
    # webhook_max_attempts was lowered: a normal last failure is marked failed when recorded.
    result = await conn.execute(
        update(deliveries)
        .where(
            deliveries.c.service == service,
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
    conn: AsyncConnection, outcomes: Sequence[Outcome], *, now: datetime, settings: WebhookSettings
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


async def outbox_summary(conn: AsyncConnection, service: str, now: datetime) -> dict[str, Any]:
    """Backlog counts (capped) and the age of the oldest event not yet delivered, for /health."""
    undispatched = and_(outbox.c.service == service, outbox.c.dispatched_at.is_(None))
    pending = and_(deliveries.c.service == service, deliveries.c.state == PENDING)
    failed = and_(deliveries.c.service == service, deliveries.c.state == FAILED)
    pending_events = deliveries.join(outbox, outbox.c.id == deliveries.c.event_id)
    row = (
        await conn.execute(
            select(
                _count_upto(undispatched, outbox),
                _count_upto(pending, deliveries),
                _count_upto(failed, deliveries),
                # The oldest by id, through the indexes, rather than min() over the backlog.
                select(outbox.c.created_at)
                .where(undispatched)
                .order_by(outbox.c.id)
                .limit(1)
                .scalar_subquery(),
                select(outbox.c.created_at)
                .select_from(pending_events)
                .where(pending)
                .order_by(deliveries.c.id)
                .limit(1)
                .scalar_subquery(),
            )
        )
    ).one()
    undispatched_events, pending_count, failed_count, *oldest = row
    ages = [(now - created_at).total_seconds() for created_at in oldest if created_at is not None]
    return {
        "undispatched_events": undispatched_events,
        "pending_deliveries": pending_count,
        "failed_deliveries": failed_count,
        "counts_capped_at": HEALTH_COUNT_CAP,
        "oldest_pending_age_seconds": round(max([0.0, *ages]), 3),
    }


async def list_deliveries(
    conn: AsyncConnection,
    service: str,
    *,
    state: DeliveryState | None,
    event_id: UUID | None,
    limit: int,
    before_id: int | None,
) -> Page[Delivery]:
    """The service's deliveries, newest first, optionally of one state or one event."""
    query = (
        select(
            deliveries.c.id,
            outbox.c.event_id,
            deliveries.c.url,
            deliveries.c.state,
            deliveries.c.attempts,
            deliveries.c.next_attempt_at,
            deliveries.c.last_status,
            deliveries.c.last_error,
            deliveries.c.delivered_at,
            deliveries.c.created_at,
        )
        .select_from(deliveries.join(outbox, outbox.c.id == deliveries.c.event_id))
        .where(deliveries.c.service == service)
    )
    if state is not None:
        query = query.where(deliveries.c.state == state)
    if event_id is not None:
        query = query.where(outbox.c.event_id == event_id)
    if before_id is not None:
        query = query.where(deliveries.c.id < before_id)
    rows = (await conn.execute(query.order_by(deliveries.c.id.desc()).limit(limit + 1))).all()
    return keyset_page(rows, limit, Delivery)


async def purge_delivered(conn: AsyncConnection, service: str, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` deliveries delivered before ``before``; returns how many.

    Failed deliveries stay until someone looks at them; so do their events.
    """
    old = deliveries.alias("old")  # its own FROM: not correlated with the DELETE's table
    doomed = (
        select(old.c.id)
        .where(old.c.service == service, old.c.state == DELIVERED, old.c.delivered_at < before)
        .limit(limit)
    )
    gone = await conn.execute(delete(deliveries).where(deliveries.c.id.in_(doomed)))
    return int(gone.rowcount or 0)


async def purge_settled_events(
    conn: AsyncConnection, service: str, before: datetime, limit: int
) -> int:
    """Delete up to ``limit`` events dispatched before ``before`` with nothing left to deliver."""
    settled = outbox.alias("settled")  # its own FROM: not correlated with the DELETE's table
    still_owed = select(deliveries.c.id).where(deliveries.c.event_id == settled.c.id).exists()
    doomed = (
        select(settled.c.id)
        .where(settled.c.service == service, settled.c.dispatched_at < before, ~still_owed)
        .limit(limit)
    )
    gone = await conn.execute(delete(outbox).where(outbox.c.id.in_(doomed)))
    return int(gone.rowcount or 0)
