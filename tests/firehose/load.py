"""Events with known ids for the firehose's proofs, their senders, and how often each is stored."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import httpx
from sqlalchemy import func, select

from keel.core.database import Database
from keel.core.uuid7 import uuid7
from keel.firehose.events import EventRow, now_us
from keel.firehose.tables import events


def rows(count: int, user: str = "spool") -> list[EventRow]:
    """``count`` events with fresh UUIDv7 ids, as ingest would have decoded them."""
    now = now_us()
    return [EventRow(uuid7(), user, "click", now, now, None, now, None) for _ in range(count)]


async def store_counts(database: Database, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, int]:
    """How many rows the store holds for each id (read from the database, never from replies)."""
    wanted = list(ids)
    counts: dict[uuid.UUID, int] = dict.fromkeys(wanted, 0)
    async with database.read() as conn:
        for start in range(0, len(wanted), 5_000):
            chunk = wanted[start : start + 5_000]
            values = [i.bytes for i in chunk] if database.is_sqlite else chunk
            found = await conn.execute(
                select(events.c.event_id, func.count())
                .where(events.c.event_id.in_(values))
                .group_by(events.c.event_id)
            )
            for event_id, count in found:
                key = uuid.UUID(bytes=event_id) if isinstance(event_id, bytes) else event_id
                counts[key] = count
    return counts


async def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` (sync or async) until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = condition()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


# What a sender may be told while the store comes and goes: accepted, or refused out loud.
REFUSALS = {(503, "buffer_full"), (503, "overloaded")}


@dataclass
class Senders:
    """Clients posting events with known ids; every id a 202 acknowledged, and every answer."""

    phase: str = "before"
    cut_expected: bool = False  # the server is killed under them: a lost connection ends a sender
    acknowledged: list[str] = field(default_factory=list)
    answers: Counter[tuple[str, int, str | None]] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def accepted(self, phase: str) -> int:
        return sum(n for (p, status, _), n in self.answers.items() if p == phase and status == 202)

    async def sender(self, client: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            ids = [str(uuid7()) for _ in range(rng.choice((1, 1, 5, 20)))]
            batch = [{"event_id": i, "user_id": f"u{seed}", "timestamp": time.time()} for i in ids]
            try:
                if len(batch) == 1:
                    reply = await client.post("/events", json=batch[0])
                else:
                    reply = await client.post("/events/batch", json=batch)
            except httpx.TransportError as exc:
                if self.cut_expected:
                    return
                self.wrong.append(f"{self.phase}: {exc!r}")
                continue
            self.record(reply, ids)
            if reply.status_code != 202:
                await asyncio.sleep(0.05)  # a client's back-off before it tries again

    def record(self, reply: httpx.Response, ids: list[str]) -> None:
        code = None if reply.status_code == 202 else reply.json().get("code")
        self.answers[(self.phase, reply.status_code, code)] += 1
        if reply.status_code == 202:
            self.acknowledged += ids
        elif (reply.status_code, code) not in REFUSALS:
            self.wrong.append(f"{self.phase}: {reply.status_code} {reply.text[:300]}")
        elif reply.headers.get("retry-after") != "1":
            self.wrong.append(f"{self.phase}: 503 without Retry-After: {reply.text[:300]}")
