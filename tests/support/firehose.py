"""Firehose load with known ids, and reading the store back: for crash and outage proofs.

A sender posts single events and small batches, each event with an id the test chose, and
records which ids got a 202. Whatever the server does meanwhile (dies, loses its store), the
proof is then read from the database: every acknowledged id is stored exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx
from sqlalchemy import func, select

from keel.core.database import Database, create_engine
from keel.core.uuid7 import uuid7
from keel.firehose.tables import events


@dataclass
class Sender:
    """Concurrent senders of events with known ids; what got a 202, and what else was answered."""

    key: str
    acknowledged: set[uuid.UUID] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    failed_connections: int = 0
    batch_every: int = 4  # one request in this many is a batch of 20
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    async def run(self, base_url: str, senders: int, until: asyncio.Event) -> None:
        """Send from ``senders`` concurrent clients until ``until`` is set."""
        async with httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=httpx.Timeout(30.0),
            limits=httpx.Limits(max_connections=senders),
        ) as client:
            await asyncio.gather(*(self._send(client, until) for _ in range(senders)))

    def acked_at_least(self, count: int) -> bool:
        return len(self.acknowledged) >= count

    async def _send(self, client: httpx.AsyncClient, until: asyncio.Event) -> None:
        while not until.is_set():
            n = next(self._counter)
            ids = [uuid7() for _ in range(20 if n % self.batch_every == 0 else 1)]
            bodies = [
                {
                    "event_id": str(i),
                    "user_id": f"u{n % 50}",
                    "name": "load",
                    "timestamp": time.time(),
                }
                for i in ids
            ]
            try:
                if len(ids) == 1:
                    reply = await client.post("/events", json=bodies[0])
                else:
                    reply = await client.post("/events/batch", json=bodies)
            except httpx.TransportError:
                self.failed_connections += 1
                await asyncio.sleep(0.05)  # the server is down: pace the retries, not a wait
                continue
            self.statuses[reply.status_code] += 1
            if reply.status_code == 202:
                body = reply.json()
                assert len(ids) == 1 or not body["rejected"], body
                self.acknowledged.update(ids)
            else:
                self.codes[reply.json().get("code", "?")] += 1


async def stored_counts(database_url: str, ids: Iterable[uuid.UUID]) -> Counter[uuid.UUID]:
    """How many times each id is in the store (0 if missing), read from the database."""
    wanted = list(ids)
    database = Database(create_engine(database_url))
    counts: Counter[uuid.UUID] = Counter({i: 0 for i in wanted})
    try:
        async with database.read() as conn:
            for start in range(0, len(wanted), 5_000):
                chunk = wanted[start : start + 5_000]
                values = [i.bytes for i in chunk] if database.is_sqlite else chunk
                rows = await conn.execute(
                    select(events.c.event_id, func.count())
                    .where(events.c.event_id.in_(values))
                    .group_by(events.c.event_id)
                )
                for event_id, count in rows:
                    key = uuid.UUID(bytes=event_id) if isinstance(event_id, bytes) else event_id
                    counts[key] = count
    finally:
        await database.dispose()
    return counts


def assert_each_stored_once(counts: Counter[uuid.UUID]) -> None:
    missing = [i for i, c in counts.items() if c == 0]
    doubled = [i for i, c in counts.items() if c > 1]
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {missing[:3]}"
    assert not doubled, f"{len(doubled)} events stored twice, e.g. {doubled[:3]}"
