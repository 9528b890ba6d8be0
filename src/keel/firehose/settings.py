"""The firehose's settings: ``KEEL_FIREHOSE_*``, falling back to the shared ``KEEL_*``."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from keel.core.settings import DATA_DIR, ServiceSettings

BufferKind = Literal["direct", "spool", "redis"]


class FirehoseSettings(ServiceSettings):
    """Where accepted events wait (the buffer) and how writers move them to the store."""

    model_config = SettingsConfigDict(env_prefix="KEEL_FIREHOSE_", extra="ignore")

    service_name: ClassVar[str] = "firehose"
    default_port: ClassVar[int] = 8000

    # auto: a SQLite store is its own durable buffer ("direct"); a PostgreSQL store gets a local
    # spool file, which carries ingestion through a store outage. "redis" needs KEEL_REDIS_URL.
    buffer: Literal["auto", "direct", "spool", "redis"] = "auto"
    spool_path: Path = DATA_DIR / "firehose-spool.db"
    # Events the buffer may hold before ingest answers 503 buffer_full (never a silent drop).
    buffer_max_events: int = Field(default=1_000_000, ge=1)
    # Writers move events from the buffer to the store by size or by age, whichever comes first.
    flush_size: int = Field(default=5_000, ge=1, le=100_000)
    flush_age_ms: int = Field(default=200, ge=1)
    # Requests whose events one buffer transaction (group commit) carries at most, and events.
    max_batch: int = Field(default=512, ge=1)
    max_batch_events: int = Field(default=10_000, ge=1)
    # Events a process holds in memory waiting for their group commit; past it, 503 overloaded
    # (a bound on memory: 4,096 queued requests of 1 MiB each would be 4 GiB).
    ingest_queue_max_events: int = Field(default=50_000, ge=1)
    # The depth counter is "<stream>:depth", and the scripts touch both keys at once: on Redis
    # Cluster they must share a hash slot, hence the {hash tag} (keep one in a name of your own).
    redis_stream: str = "keel:{firehose}:events"
    redis_group: str = "keel-firehose-writers"
    # A Redis entry read by a writer and not acknowledged for this long is taken over by another.
    claim_idle_seconds: float = Field(default=30.0, gt=0)
    # Every Redis call of the buffer waits at most this long (a blocking read: this past its block).
    redis_timeout_seconds: float = Field(default=2.0, gt=0, le=60)

    @property
    def buffer_kind(self) -> BufferKind:
        if self.buffer != "auto":
            return self.buffer
        return "direct" if self.is_sqlite else "spool"
