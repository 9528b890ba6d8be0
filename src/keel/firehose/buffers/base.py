"""What every buffer offers the ingest routes, ``/health`` and ``/ready``."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from prometheus_client import Counter, Gauge, Histogram

from keel.core.errors import Overloaded
from keel.firehose.events import EventRow

BUFFER_DEPTH = Gauge(
    "keel_firehose_buffer_depth", "Events waiting in the buffer (as last measured).", ["buffer"]
)
FLUSHED = Counter("keel_firehose_flushed_events_total", "Events written to the store by writers.")
FLUSH_SECONDS = Histogram(
    "keel_firehose_flush_seconds",
    "Time to write one batch from the buffer into the store.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
FLUSH_SIZE = Histogram(
    "keel_firehose_flush_events",
    "Events per batch written from the buffer into the store.",
    buckets=(1, 10, 100, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000),
)
DEAD_LETTERED = Counter("keel_firehose_dead_lettered_total", "Events the store refused.")


@dataclass
class StoreStatus:
    """What writers last saw of the store: for ``/health`` and the writer-lag figure."""

    status: str = "ok"  # "ok" | "down"
    error: str | None = None
    last_flush: float | None = None  # time.time() of the last batch committed
    down_since: float | None = None

    def flushed(self, events: int, seconds: float, refused: int = 0) -> None:
        FLUSHED.inc(events - refused)
        FLUSH_SIZE.observe(events)
        FLUSH_SECONDS.observe(seconds)
        if refused:
            DEAD_LETTERED.inc(refused)
        self.status, self.error, self.down_since = "ok", None, None
        self.last_flush = time.time()

    def failed(self, exc: BaseException) -> None:
        if self.status == "ok":
            self.down_since = time.time()
        self.status, self.error = "down", type(exc).__name__

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status}
        if self.error is not None:
            body["error"] = self.error
        if self.down_since is not None:
            body["down_for_seconds"] = round(time.time() - self.down_since, 3)
        if self.last_flush is not None:
            body["last_flush_seconds_ago"] = round(time.time() - self.last_flush, 3)
        return body


@dataclass
class BufferHealth:
    """The buffer's part of ``GET /health``."""

    kind: str
    depth: int  # events accepted (202) and not yet in the store
    oldest_age_seconds: float | None  # of the oldest of them
    max_events: int | None  # the bound past which ingest answers 503 buffer_full
    durability: str  # what a 202 survives, in words
    store: StoreStatus = field(default_factory=StoreStatus)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        BUFFER_DEPTH.labels(self.kind).set(self.depth)
        lag = self.oldest_age_seconds or 0.0
        return {
            "buffer": {
                "kind": self.kind,
                "depth": self.depth,
                "oldest_age_seconds": self.oldest_age_seconds,
                "max_events": self.max_events,
                "durability": self.durability,
                **self.extra,
            },
            "store": self.store.as_dict(),
            "writer": {"lag_seconds": round(lag, 3)},
        }


class Buffer(ABC):
    """A durable place for accepted events, and the writers that empty it into the store."""

    kind: ClassVar[str]
    waiting = 0  # events of this process waiting for their group commit now
    max_waiting = 50_000

    async def submit(self, rows: Sequence[EventRow]) -> None:
        """:meth:`append`, refused with 503 ``overloaded`` past ``max_waiting`` events in memory."""
        if self.waiting + len(rows) > self.max_waiting and self.waiting:
            raise Overloaded(
                f"{self.waiting} events are waiting to be written here; nothing was accepted;"
                " retry.",
                headers={"Retry-After": "1"},
            )
        self.waiting += len(rows)
        try:
            await self.append(rows)
        finally:
            self.waiting -= len(rows)

    @abstractmethod
    async def start(self) -> None:
        """Open the buffer and start its writers (called in the app's lifespan)."""

    @abstractmethod
    async def append(self, rows: Sequence[EventRow]) -> None:
        """Return once ``rows`` are durable; raise ``BufferFull``/``BufferUnavailable`` if not."""

    @abstractmethod
    async def stop(self) -> None:
        """Refuse new events, flush what can be flushed; the rest stays for the next start."""

    @abstractmethod
    async def health(self) -> BufferHealth:
        """Depth, oldest age, store status: cheap enough to call on every ``GET /health``."""

    def unready(self) -> str | None:
        """Why ingest cannot take events now, or None (a ``GET /ready`` check)."""
        return None
