"""The Redis buffer's writer: one per process, a consumer in the stream's consumer group.

It reads entries (each one group commit's events), gathers them until it holds ``flush_size``
events or the oldest has waited ``flush_age_ms``, stores them with :func:`store_batch`, and only
then acknowledges them, deleting them from the stream and lowering the depth counter in one
script, so Redis holds only what the store does not have yet. While the store takes one batch,
the writer reads and decodes the next (a backlog drains at PostgreSQL's pace, not at the sum of
both sides'). Reads count events, not entries, so a writer holds about ``flush_size`` events a
batch (at most one entry more), two batches while it reads ahead, however big entries are.

Nothing blocks the stream for good: an entry that does not decode is logged and acknowledged
(counted on ``/health``); rows the store refuses for good are dead-lettered after a few tries.

A writer killed between reading and acknowledging leaves its entries pending on its consumer;
every few seconds each writer takes over (``XAUTOCLAIM``) entries pending for longer than
``claim_idle_seconds``, so they are stored by another. Storing twice is harmless (the store
dedupes); acknowledging twice lowers the counter once, because only the ``XACK`` that removed an
entry from the pending list counts. Consumers that died with nothing pending are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from keel.core.database import Database
from keel.core.errors import sqlstate_of
from keel.firehose.buffers.base import StoreStatus
from keel.firehose.buffers.redis_scripts import ACK_LUA, REAP_LUA, TAKE_LUA
from keel.firehose.events import EventRow
from keel.firehose.settings import FirehoseSettings
from keel.firehose.store import dead_letter, store_batch

log = logging.getLogger("keel.firehose.redis")
T = TypeVar("T")

MAX_ENTRIES_PER_READ = 1_000
STORE_RETRY_MAX_SECONDS = 5.0
# SQLSTATE classes of a store that is away or busy, not refusing the rows: connection (08),
# rollback (40: serialization, deadlock), resources (53), operator intervention (57: shutdown),
# system (58). Any other SQLSTATE is the store refusing the rows, retried this many times in a
# row before the refused events are dead-lettered: left, they would block the stream for good.
PASSING_SQLSTATE_CLASSES = ("08", "40", "53", "57", "58")
REFUSALS_BEFORE_DEAD_LETTERS = 3


def refused_for_good(exc: BaseException) -> bool:
    """Whether the store answered with a refusal that retrying the same rows will not change."""
    state = sqlstate_of(exc)
    return state is not None and not state.startswith(PASSING_SQLSTATE_CLASSES)


async def store_or_dead_letter(database: Database, rows: list[EventRow]) -> int:
    """Like :func:`store_batch`, but rows refused for good are halved until the refused ones
    stand alone, and those are dead-lettered with the store's reason; returns how many."""
    try:
        return await store_batch(database, rows)
    except Exception as exc:
        if not refused_for_good(exc):
            raise
        if len(rows) == 1:
            orig = getattr(exc, "orig", exc)
            reason = f"{sqlstate_of(exc)}: {str(orig).strip().splitlines()[0][:500]}"
            log.error("event %s refused by the store: %s", rows[0].event_id, reason)
            await dead_letter(database, rows[0], reason)
            return 1
    half = len(rows) // 2
    return await store_or_dead_letter(database, rows[:half]) + await store_or_dead_letter(
        database, rows[half:]
    )


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """The keys of one buffer, all named from ``redis_stream`` (one hash slot with ``{tags}``)."""

    stream: str
    depth: str
    group: str

    @classmethod
    def of(cls, settings: FirehoseSettings) -> StreamKeys:
        stream = settings.redis_stream
        return cls(stream=stream, depth=f"{stream}:depth", group=settings.redis_group)


@dataclass(slots=True)
class Entry:
    """One stream entry: the events of one group commit (``n`` of them in the depth counter)."""

    id: bytes
    rows: list[EventRow]
    n: int


class RedisReach:
    """Since when this process's calls to Redis fail: /ready says not ready meanwhile.

    Set by a failed commit or writer call, cleared by the next one Redis answers; the writer
    calls Redis every ``flush_age_ms`` even without traffic, so the flag clears by itself.
    """

    def __init__(self) -> None:
        self.failing_since: float | None = None

    def failed(self) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()

    def answered(self) -> None:
        self.failing_since = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(flat: Any) -> dict[bytes, Any] | None:
    """A script's flat field list as XREADGROUP's reply has it (None: a deleted entry)."""
    if not isinstance(flat, list):
        return None
    return dict(zip(flat[::2], flat[1::2], strict=True))


def consumer_name() -> str:
    """Unique per process and start: a restarted writer never inherits a dead one's entries."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


async def ensure_group(client: aioredis.Redis, keys: StreamKeys, within: float) -> None:
    """Create the consumer group (and the stream) unless it exists; from the stream's start."""
    try:
        async with asyncio.timeout(within):
            await client.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class StreamWriter:
    """Moves entries from the stream to the store, by size or age, acknowledging afterwards."""

    def __init__(
        self,
        client: aioredis.Redis,
        database: Database,
        settings: FirehoseSettings,
        status: StoreStatus,
        reach: RedisReach | None = None,
    ) -> None:
        self.consumer = consumer_name()
        self.reach = reach or RedisReach()
        self._client = client
        self._database = database
        self._settings = settings
        self._status = status
        self._keys = StreamKeys.of(settings)
        self._timeout = settings.redis_timeout_seconds
        self._ack = client.register_script(ACK_LUA)
        self._reap = client.register_script(REAP_LUA)
        self._take_lua = client.register_script(TAKE_LUA)
        self._decode = msgspec.msgpack.Decoder(list[EventRow]).decode
        self._held: list[Entry] = []  # read and not yet acknowledged
        self._ahead: list[Entry] = []  # the next batch, read while the store took the held one
        self.set_aside = 0  # entries that did not decode, acknowledged without being stored
        self._stored = False  # the held entries are in the store; only the ack is missing
        self._claim_every = min(max(settings.claim_idle_seconds / 2, 0.1), 5.0)
        self._next_claim = 0.0
        self._claim_cursor = "0-0"
        self._stopping = asyncio.Event()

    @property
    def held(self) -> int:
        """Events read and not yet acknowledged."""
        return sum(len(entry.rows) for entry in (*self._held, *self._ahead))

    def stop(self) -> None:
        """Finish the batch in hand (flush it if the store takes it), then return from run()."""
        self._stopping.set()

    async def run(self) -> None:
        delay = 0.05
        while True:
            try:
                if not self._stored and not self._stopping.is_set():
                    await self._fill()
                if self._held:
                    await self._flush()
                if self._stopping.is_set() and not self._held:
                    return  # whatever the store did not take stays pending in Redis
                delay = 0.05
            except (RedisError, OSError, TimeoutError) as exc:  # Redis away: retry, keep the batch
                if self._stopping.is_set():
                    log.warning("%s: Redis failed while stopping (%r)", self.consumer, exc)
                    return
                if "NOGROUP" in str(exc):  # Redis restarted empty: the group went with the data
                    log.warning("%s: consumer group missing; creating it", self.consumer)
                    with contextlib.suppress(RedisError, OSError, TimeoutError):
                        await ensure_group(self._client, self._keys, self._timeout)
                else:
                    log.warning("%s: Redis call failed (%r); retrying", self.consumer, exc)
                await self._pause(delay)
                delay = min(delay * 2, STORE_RETRY_MAX_SECONDS)

    async def _fill(self) -> None:
        """Read until ``flush_size`` events are held or the first one held is ``flush_age`` old."""
        age = self._settings.flush_age_ms / 1000
        first_read: float | None = time.monotonic() if self._held else None
        while not self._stopping.is_set():
            events = sum(len(e.rows) for e in self._held)
            if events >= self._settings.flush_size:
                return
            if time.monotonic() >= self._next_claim:
                await self._claim(self._settings.flush_size - events)
                if self._held and first_read is None:
                    first_read = time.monotonic()
                continue
            block = age
            if first_read is not None:
                block = age - (time.monotonic() - first_read)
                if block <= 0:
                    return
            if await self._read(self._settings.flush_size - events, block) and first_read is None:
                first_read = time.monotonic()

    async def _read(self, events_wanted: int, block: float) -> int:
        """Take new entries holding about ``events_wanted`` events; if none are there, wait
        ``block`` for one (cut short by stop()); returns how many came.

        A read cut short may have moved an entry onto this consumer's pending list with the reply
        lost: it is taken over after ``claim_idle_seconds`` like any stalled writer's.
        """
        taken = await self._take_script(events_wanted, "new")
        if taken:
            return taken
        read = asyncio.ensure_future(
            self._call(
                self._client.xreadgroup(
                    self._keys.group,
                    self.consumer,
                    {self._keys.stream: ">"},
                    count=1,  # one entry: at most max_batch_events past what was asked
                    block=max(1, int(block * 1000)),
                ),
                extra=block,
            )
        )
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([read, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not read.done():
                read.cancel()
                await asyncio.wait([read])
        if read.cancelled():
            return 0
        reply: Any = read.result()
        if not reply:
            return 0
        return self._take(reply[0][1])

    async def _take_script(
        self, events_wanted: int, *how: Any, into: list[Entry] | None = None
    ) -> int:
        """Run :data:`TAKE_LUA`; returns how many entries were taken."""
        args = [self._keys.group, self.consumer, events_wanted, MAX_ENTRIES_PER_READ, *how]
        reply: Any = await self._call(self._take_lua(keys=[self._keys.stream], args=args))
        cursor, entries = reply[0], reply[1]
        if how[0] != "new":
            self._claim_cursor = _text(cursor)
        return self._take([(entry[0], _fields(entry[1])) for entry in entries], into)

    async def _claim(self, events_wanted: int) -> None:
        """Take over entries pending on another consumer for over ``claim_idle_seconds``."""
        self._next_claim = time.monotonic() + self._claim_every
        min_idle = int(self._settings.claim_idle_seconds * 1000)
        taken = await self._take_script(events_wanted, min_idle, self._claim_cursor)
        if taken:
            log.warning("%s: took over %d entries of a stalled writer", self.consumer, taken)
        if self._claim_cursor == "0-0":  # a full pass over the pending list: tidy consumers
            await self._reap_dead_consumers()

    def _take(self, entries: list[Any], into: list[Entry] | None = None) -> int:
        taken = 0
        held = {entry.id for entry in (*self._held, *self._ahead)}
        for entry_id, fields in entries:
            if fields is None or entry_id in held:  # deleted (never by keel), or ours already
                continue
            (self._held if into is None else into).append(self._entry(entry_id, fields))
            taken += 1
        return taken

    def _entry(self, entry_id: bytes, fields: dict[bytes, Any]) -> Entry:
        """The entry's events; one that does not decode is held with none, to be acknowledged
        (and counted out of the depth by its own ``n``) with the rest: left pending, it would
        be taken over again every claim cycle, for ever, and keep its events in the bound."""
        try:
            rows = self._decode(fields[b"rows"])
        except (KeyError, msgspec.DecodeError) as exc:
            try:
                n = int(fields.get(b"n", 0))
            except ValueError:
                n = 0
            self.set_aside += 1
            log.error(
                "%s: entry %s of %s is not a keel batch (%s); setting it aside, %d event(s)"
                " dropped from the buffer; its fields: %r",
                self.consumer,
                _text(entry_id),
                self._keys.stream,
                exc,
                n,
                {_text(k): v[:4096] if isinstance(v, bytes) else v for k, v in fields.items()},
            )
            return Entry(entry_id, [], n)
        return Entry(entry_id, rows, len(rows))

    async def _flush(self) -> None:
        """Store what is held (retrying while the store is down), reading the next batch
        meanwhile, then acknowledge what was stored."""
        rows = [row for entry in self._held for row in entry.rows]
        if not self._stored and rows:
            storing = asyncio.ensure_future(self._store(rows))
            try:
                await self._read_ahead(storing)
                self._stored = await storing
            finally:
                storing.cancel()  # only if this task itself was cancelled: it is done otherwise
            if not self._stored:  # stopping: left pending in Redis, for another writer
                self._held.clear()
                self._ahead.clear()
                return
        args: list[Any] = [self._keys.group]
        for entry in self._held:
            args += [entry.id, entry.n]
        await self._call(self._ack(keys=[self._keys.stream, self._keys.depth], args=args))
        self._held, self._ahead = self._ahead, []
        self._stored = False

    async def _store(self, rows: list[EventRow]) -> bool:
        """Store ``rows``, retrying while the store is away; False if it gave up to stop."""
        delay, refusals = 0.05, 0
        while True:
            started = time.monotonic()
            try:
                if refusals >= REFUSALS_BEFORE_DEAD_LETTERS:
                    refused = await store_or_dead_letter(self._database, rows)
                else:
                    refused = await store_batch(self._database, rows)
            except Exception as exc:
                self._status.failed(exc)
                refusals = refusals + 1 if refused_for_good(exc) else 0
                log.warning("%s: store refused a batch (%r); retrying", self.consumer, exc)
                if self._stopping.is_set():
                    return False
                await self._pause(delay)
                delay = min(delay * 2, STORE_RETRY_MAX_SECONDS)
                continue
            self._status.flushed(len(rows), time.monotonic() - started, refused)
            return True

    async def _read_ahead(self, storing: asyncio.Future[bool]) -> None:
        """While the store takes the held batch, take and decode the next one, so that Python's
        share of the work overlaps PostgreSQL's instead of following it.

        Never when a claim is due (the next fill must start empty to make it), nor blocking:
        if nothing new is there, or Redis fails, the next fill waits or meets the error."""
        while not storing.done() and not self._stopping.is_set():
            wanted = self._settings.flush_size - sum(len(e.rows) for e in self._ahead)
            if wanted <= 0 or time.monotonic() >= self._next_claim:
                return
            try:
                if not await self._take_script(wanted, "new", into=self._ahead):
                    return
            except (RedisError, OSError, TimeoutError):
                return

    async def _reap_dead_consumers(self) -> None:
        """Remove consumers idle for long with nothing pending (writers that are gone).

        A live writer with nothing pending is at most one blocking read (``flush_age_ms``) idle,
        so past that plus twice the claim time it is gone. Were a live one removed all the same,
        nothing is lost: it had nothing pending, and its next read creates it again.
        """
        idle_ms = self._settings.flush_age_ms + self._settings.claim_idle_seconds * 2000
        consumers = await self._call(
            self._client.xinfo_consumers(self._keys.stream, self._keys.group)
        )
        for consumer in consumers:
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else name
            if name != self.consumer and consumer["pending"] == 0 and consumer["idle"] > idle_ms:
                removed = await self._call(
                    self._reap(keys=[self._keys.stream], args=[self._keys.group, name])
                )
                if removed != -1:
                    log.info("%s: removed idle consumer %s", self.consumer, name)

    async def _call(self, call: Awaitable[T], extra: float = 0.0) -> T:
        """A Redis call bounded by ``redis_timeout_seconds`` (past its own block, if it blocks)."""
        try:
            async with asyncio.timeout(self._timeout + extra):
                result = await call
        except ResponseError:
            self.reach.answered()  # refused, but it answered (NOGROUP after a restart, ...)
            raise
        except (RedisError, OSError, TimeoutError):
            self.reach.failed()
            raise
        self.reach.answered()
        return result

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if asked to stop."""
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            pass
