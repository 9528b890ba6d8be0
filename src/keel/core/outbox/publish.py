"""Publishing: a service writes its events into the outbox in its own write transaction.

An event exists if and only if the change it announces committed, because both are written in
one transaction; the worker (:mod:`keel.core.outbox.worker`) delivers it afterwards. Each event
gets a UUIDv7 at publication: the ``id`` a receiver sees and dedupes on, never reused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel
from sqlalchemy import insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from keel.core.outbox.tables import events
from keel.core.statements import BulkStatement
from keel.core.uuid7 import uuid7_batch

_COLUMNS = ["service", "event_id", "event_type", "payload", "created_at"]
_INSERT = BulkStatement(insert(events), _COLUMNS)


def _json(data: Any) -> str:
    if isinstance(data, BaseModel):
        return data.model_dump_json()
    return json.dumps(data, separators=(",", ":"))


@dataclass(frozen=True)
class Outbox:
    """A service's outbox: its name and the event types it publishes.

    Put it in the service's :class:`~keel.core.app.ServiceSpec` to get the webhook worker,
    ``GET /webhooks/deliveries`` and the outbox's part of ``/health``.
    """

    service: str
    event_types: frozenset[str]

    def __init__(self, service: str, event_types: Iterable[str]) -> None:
        object.__setattr__(self, "service", service)
        object.__setattr__(self, "event_types", frozenset(event_types))

    def rows(
        self, event_type: str, payloads: Sequence[str], created_at: datetime | None = None
    ) -> list[dict[str, Any]]:
        """The outbox rows for ``payloads`` (each the event's ``data`` as JSON text)."""
        if event_type not in self.event_types:
            raise ValueError(f"{self.service} does not publish {event_type!r}")
        now = created_at or datetime.now(UTC)
        return [
            {
                "service": self.service,
                "event_id": event_id,
                "event_type": event_type,
                "payload": payload,
                "created_at": now,
            }
            for event_id, payload in zip(uuid7_batch(len(payloads)), payloads, strict=True)
        ]

    def publish(self, conn: Connection, event_type: str, data: Any) -> UUID:
        """Publish one event (``data``: a JSON-able value or a pydantic model); returns its id."""
        return self.publish_many(conn, event_type, [_json(data)])[0]

    def insert_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Insert rows made by :meth:`rows` (of one or several types) in one call."""
        _INSERT.execute(conn, rows)

    def publish_many(
        self,
        conn: Connection,
        event_type: str,
        payloads: Sequence[str],
        *,
        created_at: datetime | None = None,
    ) -> list[UUID]:
        """Publish a batch of events of one type, ``payloads`` already JSON text, in one call."""
        rows = self.rows(event_type, payloads, created_at)
        _INSERT.execute(conn, rows)
        return [row["event_id"] for row in rows]

    async def publish_async(self, conn: AsyncConnection, event_type: str, data: Any) -> UUID:
        """:meth:`publish`, on an async connection."""
        [row] = self.rows(event_type, [_json(data)])
        await conn.execute(insert(events), [row])
        event_id: UUID = row["event_id"]
        return event_id
