"""Where an accepted event waits until the store has it: the durable buffers.

Every buffer makes the same promise, :meth:`Buffer.append` returns only once the events are
durable (group commit: many requests' events in one write), and refuses out loud otherwise
(503 ``buffer_full`` past its bound, 503 ``buffer_unavailable`` when it cannot write). Its writers
then move events to the store by size or age, and acknowledge them only after the store commits.

- :mod:`.direct`: the store is its own buffer (a SQLite store: the file is local and durable).
- :mod:`.spool`: a SQLite file on the host, drained into a PostgreSQL store; it carries
  ingestion through a store outage.
- :mod:`.redis`: Redis Streams with a consumer group of writers on any number of hosts.
"""

from __future__ import annotations

from keel.firehose.buffers.base import Buffer, BufferHealth, StoreStatus

__all__ = ["Buffer", "BufferHealth", "StoreStatus"]
