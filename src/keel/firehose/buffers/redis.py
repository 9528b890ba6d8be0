"""The Redis Streams buffer: ingest on any number of hosts, writers in one consumer group.

``KEEL_FIREHOSE_BUFFER=redis`` with ``KEEL_REDIS_URL``. Ingest group-commits: the events of all
requests that queued while the previous call was in flight go to Redis in one ``EVALSHA`` of
:data:`COMMIT_LUA`, which checks the depth counter against ``buffer_max_events``, appends one
stream entry (``n`` events, ``rows`` = their msgpack) and raises the counter, atomically. The bound
is applied per request, in order: a request that does not fit is refused (503 ``buffer_full``)
while smaller ones after it may still fit. :mod:`.redis_writer` drains the stream into the store.

What a failure is answered with: Redis unreachable before the script was sent is 503
``buffer_unavailable`` (nothing written, retry); a connection lost or a timeout after it was sent
is 502 ``outcome_unknown`` (it may have run; a retry with the same ``event_id`` is stored once).
Never a 202 unless Redis answered that the entry is in.

A 202 is as durable as Redis: at start the buffer reads Redis's persistence settings, logs what a
202 survives, shows it on ``/health``, and refuses to start with ``KEEL_ENV=production`` when AOF
is off or Redis may evict any key (``maxmemory-policy allkeys-*``). ``/ready`` says not ready while
Redis fails this process's calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from keel.core.batching import GroupCommitter
from keel.core.database import Database
from keel.core.errors import OutcomeUnknown
from keel.firehose import errors
from keel.firehose.buffers.base import Buffer, BufferHealth, StoreStatus
from keel.firehose.buffers.redis_writer import RedisReach, StreamKeys, StreamWriter, ensure_group
from keel.firehose.events import EventRow
from keel.firehose.settings import FirehoseSettings

log = logging.getLogger("keel.firehose.redis")

# KEYS: stream, depth. ARGV: max_events, then (n, rows) per request, rows being the msgpack of
# its rows without the array header. The accepted requests' rows become one entry, under one
# array header written here. Returns 1 (in) or 0 (refused: it did not fit) per request.
COMMIT_LUA = """
local max = tonumber(ARGV[1])
local depth = tonumber(redis.call('GET', KEYS[2]) or '0')
local parts, flags, total = {}, {}, 0
for i = 2, #ARGV, 2 do
  local n = tonumber(ARGV[i])
  if depth + total + n <= max then
    total = total + n
    parts[#parts + 1] = ARGV[i + 1]
    flags[#flags + 1] = 1
  else
    flags[#flags + 1] = 0
  end
end
if total > 0 then
  local header
  if total < 16 then
    header = string.char(0x90 + total)
  elseif total < 65536 then
    header = string.char(0xdc, math.floor(total / 256), total % 256)
  else
    header = string.char(0xdd, math.floor(total / 16777216) % 256,
      math.floor(total / 65536) % 256, math.floor(total / 256) % 256, total % 256)
  end
  redis.call('XADD', KEYS[1], '*', 'n', total, 'rows', header .. table.concat(parts))
  redis.call('INCRBY', KEYS[2], total)
end
return flags
"""
# The default stream before it carried a hash tag (its depth key hashed to another Cluster slot).
OLD_DEFAULT_STREAM = "keel:firehose:events"
# Connections of one process: the writer's blocking read, the committer, /health calls.
REDIS_CONNECTIONS = 16
WRITER_RESTART_SECONDS = 1.0
DURABILITY = {
    "always": "a Redis crash",
    "everysec": "a Redis crash, except up to the last second on power loss",
    "no": "a Redis crash, except what the OS had not yet written to disk on power loss",
}


def durability(appendonly: str | None, appendfsync: str | None, save: str | None) -> str:
    """What a 202 survives, in words, from Redis's persistence settings."""
    if appendonly is None:
        return "unknown: Redis refused CONFIG GET and INFO persistence"
    if appendonly == "yes":
        return DURABILITY.get(appendfsync or "", "a Redis crash (AOF; appendfsync unknown)")
    if save:
        return (
            f"only what the last RDB snapshot holds (save '{save}', no AOF):"
            " a Redis restart loses what came after it"
        )
    return "nothing: a Redis restart loses the buffer"


def _array_header_length(n: int) -> int:
    return 1 if n < 16 else 3 if n < 65536 else 5


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBuffer(Buffer):
    kind = "redis"

    def __init__(self, database: Database, settings: FirehoseSettings) -> None:
        if not settings.redis_url:
            raise ValueError("KEEL_FIREHOSE_BUFFER=redis needs KEEL_REDIS_URL")
        self._settings = settings
        self._database = database
        self._keys = StreamKeys.of(settings)
        self._timeout = settings.redis_timeout_seconds
        self._pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=REDIS_CONNECTIONS,
            timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            # No socket timeout (redis-py's default is 5 s): every call here is bounded by
            # asyncio.timeout instead, a blocking read by its block plus redis_timeout_seconds.
            socket_timeout=None,
            retry=Retry(NoBackoff(), 0),
        )
        self._client = aioredis.Redis(connection_pool=self._pool)
        self._commit_script = self._client.register_script(COMMIT_LUA)
        self._encode = msgspec.msgpack.Encoder(uuid_format="bytes").encode
        self._committer: GroupCommitter[Sequence[EventRow], None] = GroupCommitter(
            name="firehose-redis",
            commit=self._commit,
            max_batch=settings.max_batch,
            weigh=len,
            max_weight=settings.max_batch_events,
            max_queue=settings.write_queue_max,
            timeout=settings.write_timeout_seconds,
            unavailable=errors.BufferUnavailable,
        )
        self._status = StoreStatus()
        self._reach = RedisReach()
        self._writer = StreamWriter(self._client, database, settings, self._status, self._reach)
        self._writer_task: asyncio.Task[None] | None = None
        self._persistence: dict[str, str | None] = {}
        self._durability = "unknown: not started"
        self._last_depth = 0
        self._stopping = False

    async def start(self) -> None:
        """Read Redis's persistence, create the group, start the committer and the writer."""
        await self._read_persistence()
        await self._warn_of_old_default_stream()
        await ensure_group(self._client, self._keys, self._timeout)
        self._committer.start()
        self._start_writer()

    def _start_writer(self) -> None:
        self._writer_task = asyncio.create_task(
            self._writer.run(), name=f"keel-firehose-writer-{self._writer.consumer}"
        )
        self._writer_task.add_done_callback(self._on_writer_done)

    def _on_writer_done(self, task: asyncio.Task[None]) -> None:
        """Supervise the writer: a bug that killed it must not stop the draining for good.

        Restarted, it carries on with what it held; entries it had read stay pending in Redis
        meanwhile, taken over after ``claim_idle_seconds`` if it does not come back.
        """
        if self._stopping or task.cancelled() or task.exception() is None:
            return
        log.error("firehose: the Redis writer died; restarting it", exc_info=task.exception())
        asyncio.get_running_loop().call_later(WRITER_RESTART_SECONDS, self._restart_writer)

    def _restart_writer(self) -> None:
        if not self._stopping:
            self._start_writer()

    async def _warn_of_old_default_stream(self) -> None:
        """Events a keel before the default name changed accepted are still under the old one."""
        if self._keys.stream == OLD_DEFAULT_STREAM:
            return
        left = 0
        with contextlib.suppress(ResponseError):  # a key of that name that is not a stream
            async with asyncio.timeout(self._timeout):
                left = await self._client.xlen(OLD_DEFAULT_STREAM)
        if left:
            log.error(
                "firehose: %d entries wait in the Redis stream %r, the default before this"
                " version; set KEEL_FIREHOSE_REDIS_STREAM=%s until they are drained",
                left,
                OLD_DEFAULT_STREAM,
                OLD_DEFAULT_STREAM,
            )

    async def _read_persistence(self) -> None:
        config: dict[str, str | None] = dict.fromkeys(
            ("appendonly", "appendfsync", "save", "maxmemory-policy")
        )
        try:
            async with asyncio.timeout(self._timeout):
                for name in config:
                    config[name] = _text((await self._client.config_get(name))[name])
        except ResponseError as refused:  # managed Redis often disables CONFIG
            log.info("firehose: Redis refused CONFIG GET (%s); reading INFO", refused)
            with contextlib.suppress(ResponseError):
                async with asyncio.timeout(self._timeout):
                    info = await self._client.info("persistence")
                    memory = await self._client.info("memory")
                config["appendonly"] = "yes" if int(info.get("aof_enabled", 0)) else "no"
                config["maxmemory-policy"] = _text(memory.get("maxmemory_policy", "")) or None
        self._persistence = config
        self._durability = durability(config["appendonly"], config["appendfsync"], config["save"])
        log.info("firehose: Redis buffer; a 202 survives: %s (%s)", self._durability, config)
        production = self._settings.env == "production"
        if production and config["appendonly"] is None:
            log.warning("firehose: cannot tell whether Redis keeps an AOF; make sure it does")
        if production and config["appendonly"] == "no":
            raise RuntimeError(
                "KEEL_ENV=production with KEEL_FIREHOSE_BUFFER=redis needs Redis with AOF"
                " (appendonly yes, appendfsync always or everysec): the Redis at KEEL_REDIS_URL"
                f" has appendonly no, so a 202 would survive {self._durability!r}"
            )
        self._check_eviction(config["maxmemory-policy"], production)
        await self._check_replication()

    async def _check_replication(self) -> None:
        """Replicas copy asynchronously: a failover may promote one that lacks the last 202s."""
        with contextlib.suppress(ResponseError, TimeoutError):
            async with asyncio.timeout(self._timeout):
                replication = await self._client.info("replication")
            replicas = int(replication.get("connected_slaves", 0))
            if replicas:
                log.info("firehose: Redis has %d replica(s); they copy asynchronously", replicas)
                self._durability += (
                    "; not a failover: replicas copy asynchronously, so one promoted before it"
                    " received the last 202s does not have them"
                )

    def _check_eviction(self, policy: str | None, production: bool) -> None:
        """A Redis that may evict keel's keys would drop 202'd events (or the depth counter).

        ``volatile-*`` policies evict only keys with a TTL, and keel's keys have none: under
        them a full Redis refuses writes as ``noeviction`` does (503, nothing lost).
        """
        if policy is None:
            log.warning("firehose: cannot tell Redis's maxmemory-policy; make it noeviction")
        elif policy.startswith("allkeys-"):
            message = (
                f"the Redis at KEEL_REDIS_URL has maxmemory-policy {policy}: when full it evicts"
                " keys, and the stream holding accepted events is one; set it to noeviction"
            )
            if production:
                raise RuntimeError(f"KEEL_ENV=production with the Redis buffer: {message}")
            log.warning("firehose: %s", message)
            self._durability += f"; not an eviction (maxmemory-policy {policy})"

    async def append(self, rows: Sequence[EventRow]) -> None:
        await self._committer.submit(rows)

    async def _commit(self, requests: list[Sequence[EventRow]]) -> list[BaseException | None]:
        """One script call for the batch; each request in or refused on its own."""
        args: list[Any] = [self._settings.buffer_max_events]
        for rows in requests:
            encoded = self._encode(rows)
            args += [len(rows), encoded[_array_header_length(len(rows)) :]]
        flags = await self._run_commit(args)
        return [
            None if flag == 1 else self._full(len(rows))
            for flag, rows in zip(flags, requests, strict=True)
        ]

    def _full(self, events: int) -> errors.BufferFull:
        return errors.BufferFull(
            f"The buffer cannot take {events} more event(s) within its bound of"
            f" {self._settings.buffer_max_events}; nothing of this request was written; retry.",
            headers={"Retry-After": "1"},
        )

    async def _run_commit(self, args: list[Any]) -> list[int]:
        """Send the script on a connection known to be open, so a failure says what it means."""
        keys = [self._keys.stream, self._keys.depth]
        try:
            async with asyncio.timeout(self._timeout):
                conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        except (RedisError, OSError, TimeoutError) as exc:
            self._reach.failed()
            raise errors.BufferUnavailable(
                f"Redis cannot be reached ({type(exc).__name__}); nothing was written; retry.",
                headers={"Retry-After": "1"},
            ) from exc
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    await conn.send_command("EVALSHA", self._commit_script.sha, 2, *keys, *args)
                    reply = await conn.read_response()
                except NoScriptError:
                    # Not run: Redis restarted and forgot the script. Send it whole.
                    await conn.send_command("EVAL", COMMIT_LUA, 2, *keys, *args)
                    reply = await conn.read_response()
        except ResponseError as exc:  # refused before running (OOM, READONLY replica, ...)
            self._reach.failed()
            raise errors.BufferUnavailable(
                f"Redis refused the write ({str(exc)[:200]}); retry.", headers={"Retry-After": "1"}
            ) from exc
        except (RedisError, OSError, TimeoutError) as exc:
            self._reach.failed()
            await conn.disconnect()
            log.warning("firehose: Redis commit outcome unknown: %r", exc)
            raise OutcomeUnknown() from exc
        finally:
            await self._pool.release(conn)
        self._reach.answered()
        return [int(flag) for flag in reply]

    async def stop(self) -> None:
        """Refuse new events, commit the queued ones, let the writer flush its batch, close."""
        self._stopping = True
        await self._committer.stop()
        self._writer.stop()
        task = self._writer_task
        if task is not None:
            # Bounded: a store that hangs must not hold shutdown; what the writer held stays
            # pending in Redis and is taken over later.
            await asyncio.wait([task], timeout=self._settings.write_timeout_seconds)
            if not task.done():
                log.warning("firehose: the Redis writer did not finish its batch; leaving it")
                task.cancel()
                await asyncio.wait([task])
        await self._client.aclose()
        await self._pool.aclose()

    async def health(self) -> BufferHealth:
        """One pipeline: depth counter, XLEN, the group's pending/consumers, the oldest entry."""
        extra: dict[str, Any] = {
            "stream": self._keys.stream,
            "consumer": self._writer.consumer,
            "persistence": self._persistence,
            "requests_waiting": self._committer.queue_depth,
            # Entries that did not decode, acknowledged unstored (each logged with its fields).
            "entries_set_aside": self._writer.set_aside,
        }
        oldest: float | None = None
        try:
            async with asyncio.timeout(self._timeout):
                pipe = self._client.pipeline(transaction=False)
                pipe.get(self._keys.depth)
                pipe.xlen(self._keys.stream)
                pipe.xrange(self._keys.stream, "-", "+", count=1)
                pipe.xinfo_groups(self._keys.stream)
                depth, length, first, groups = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError, TimeoutError) as exc:
            extra["redis"] = f"unavailable ({type(exc).__name__})"
            extra["depth_as_of_last_answer"] = True
            depth = self._last_depth
        else:
            extra["redis"] = "ok"
            depth = int(depth) if isinstance(depth, bytes | int) else 0
            extra["entries"] = length if isinstance(length, int) else 0
            if isinstance(first, list) and first:
                ms = int(_text(first[0][0]).split("-")[0])
                oldest = max(0.0, time.time() - ms / 1000)
            for group in groups if isinstance(groups, list) else []:
                if _text(group["name"]) == self._keys.group:
                    extra["pending"] = group["pending"]
                    extra["consumers"] = group["consumers"]
                    extra["undelivered"] = group.get("lag")
        self._last_depth = depth
        return BufferHealth(
            kind=self.kind,
            depth=depth,
            oldest_age_seconds=None if oldest is None else round(oldest, 3),
            max_events=self._settings.buffer_max_events,
            durability=self._durability,
            store=self._status,
            extra=extra,
        )

    def unready(self) -> str | None:
        if self._writer_task is not None and self._writer_task.done():
            return "firehose-redis: the writer stopped"
        since = self._reach.failing_since
        if since is not None:
            return f"firehose-redis: Redis failing for {time.monotonic() - since:.1f} s"
        return self._committer.unready()
