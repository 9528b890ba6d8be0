"""The store as its own buffer: each group commit writes the events straight into the store.

The embedded default. With a SQLite store, a separate buffer would be a second copy of every
event in a file on the same disk, written in the same kind of transaction; so the group commit
writes into ``firehose_events`` itself, and a 202 means the event is in the store (committed with
``synchronous=FULL``). Nothing is buffered between a reply and the store, so depth is always 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Connection

from keel.core.batching import GroupCommitter
from keel.core.database import Database
from keel.firehose.buffers.base import Buffer, BufferHealth
from keel.firehose.events import EventRow
from keel.firehose.settings import FirehoseSettings
from keel.firehose.store import insert_rows, insert_sqlite_values, sqlite_events, sqlite_values


def _write_events(conn: Connection, requests: list[Sequence[Any]]) -> list[None]:
    insert_rows(conn, [row for rows in requests for row in rows])
    return [None] * len(requests)


def _write_sqlite_values(conn: Connection, requests: list[list[Any]]) -> list[None]:
    insert_sqlite_values(conn, requests)
    return [None] * len(requests)


class DirectBuffer(Buffer):
    kind = "direct"

    def __init__(self, database: Database, settings: FirehoseSettings) -> None:
        self._database = database
        self._settings = settings
        # On SQLite a request queues its rows as the insert's values, built in its own task.
        sqlite = database.is_sqlite
        self._committer: GroupCommitter[Any, None] = GroupCommitter(
            name="firehose-ingest",
            database=database,
            apply=_write_sqlite_values if sqlite else _write_events,
            max_batch=settings.max_batch,
            weigh=sqlite_events if sqlite else len,
            max_weight=settings.max_batch_events,
        )

    async def start(self) -> None:
        self._committer.start()

    async def append(self, rows: Sequence[EventRow]) -> None:
        await self._committer.submit(sqlite_values(rows) if self._database.is_sqlite else rows)

    async def stop(self) -> None:
        await self._committer.stop()

    async def health(self) -> BufferHealth:
        return BufferHealth(
            kind=self.kind,
            depth=0,
            oldest_age_seconds=None,
            max_events=None,
            durability=self._durability(),
            extra={
                "requests_waiting": self._committer.queue_depth,
                "max_requests_waiting": self._settings.write_queue_max,
            },
        )

    def _durability(self) -> str:
        if not self._database.is_sqlite:
            return "the store itself: a 202 is committed in the database"
        synchronous = self._settings.sqlite_synchronous
        survives = {
            "OFF": "a crash of keel, not of the machine",
            "NORMAL": "a crash of keel; a power loss may take the last commits",
        }.get(synchronous, "a crash and a power loss")
        return f"the store itself (SQLite, synchronous={synchronous}): a 202 survives {survives}"

    def unready(self) -> str | None:
        return self._committer.unready()
