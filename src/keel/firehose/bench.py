"""The firehose's bench: single events and batches of 500, on SQLite and PostgreSQL.

``keel bench firehose`` measures these with the generic runner in :mod:`keel.bench`, beside the
reference rows, then the Redis buffer's probes: a 2 M backlog drained (:mod:`.bench_drain`), and
batches sustained with the backlog, Redis's memory and each process's RSS watched
(:mod:`.bench_sustained`).

wrk's Lua makes every event afresh, with its own id: UUIDv7-like (the time in milliseconds
first, then random bits, as keel's client makes them) or random v4, so the unique
index sees what production would. Each event's ``name`` says how many events its request carried
(``bench.1``, ``bench.500``), which lets the database itself say how many requests were stored.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from keel.bench.probes import Probe
from keel.bench.scenarios import Backend, Scenario, ServiceBench

BATCH_SIZE = 500
USERS = 10_000  # events are spread over this many user ids, as the (user_id, time) index sees them
NAME_PREFIX = "bench."
# The targets: these two for SQLite (PostgreSQL-direct rows are measured, not held to
# them), the drain for Redis into PostgreSQL, the RSS for any process under sustained load.
SINGLE_TARGET_RPS = 15_000
BATCH_TARGET_EVENTS = 150_000
DRAIN_TARGET_EVENTS = 100_000
RSS_TARGET_MB = 300
DRAIN_EVENTS = 2_000_000
PREFILLED = 3_000_000  # the drain's table "already holds millions"
ENTRY_EVENTS = BATCH_SIZE  # one stream entry a request: the smallest entries batches make
# The steady batch load the Redis writers must keep up with: half the SQLite batch target, as
# much as ingest and writers together leave room for on a 2-core machine.
SUSTAINED_EVENTS = 50_000


class Load(StrEnum):
    """What each request sends."""

    EVENT_V7 = "event-v7"  # POST /events, one event with a fresh UUIDv7-like event_id
    BATCH_V7 = "batch-v7"  # POST /events/batch, 500 events with UUIDv7-like ids
    BATCH_V4 = "batch-v4"  # the same with random v4 ids: the unique index takes random inserts


# The targets are for SQLite at its defaults (every 202 fsynced) and UUIDv7 ids; the
# other rows show what a setting or random ids change, without a target of their own.


def _single(
    name: str, backend: Backend, summary: str, env: tuple[tuple[str, str], ...] = ()
) -> Scenario:
    sqlite = backend is Backend.SQLITE and not env
    return Scenario(
        name,
        backend,
        Load.EVENT_V7,
        summary,
        target_rps=SINGLE_TARGET_RPS if sqlite else 0,
        target_p99_ms=25 if sqlite else None,
        default_workers=2,
        env=env,
    )


def _batch(
    name: str, backend: Backend, load: Load, summary: str, env: tuple[tuple[str, str], ...] = ()
) -> Scenario:
    return Scenario(
        name,
        backend,
        load,
        summary,
        target_rps=(
            BATCH_TARGET_EVENTS / BATCH_SIZE
            if backend is Backend.SQLITE and load is Load.BATCH_V7
            else 0
        ),
        default_workers=2,
        env=env,
        items_per_request=BATCH_SIZE,
    )


def postgres_scenarios(buffer: str, env: tuple[tuple[str, str], ...] = ()) -> tuple[Scenario, ...]:
    """The PostgreSQL rows for one buffer (``KEEL_FIREHOSE_BUFFER``)."""
    settings = (("KEEL_FIREHOSE_BUFFER", buffer), *env)
    return (
        _single(
            f"postgres-{buffer}-event",
            Backend.POSTGRES,
            f"PostgreSQL store, {buffer} buffer, POST /events, one event a request",
            settings,
        ),
        _batch(
            f"postgres-{buffer}-batch-500",
            Backend.POSTGRES,
            Load.BATCH_V7,
            f"PostgreSQL store, {buffer} buffer, POST /events/batch of 500 UUIDv7 events",
            settings,
        ),
    )


SQLITE_SCENARIOS: tuple[Scenario, ...] = (
    _single(
        "sqlite-event",
        Backend.SQLITE,
        "SQLite (direct buffer), POST /events, one event a request with a UUIDv7 id made by wrk",
    ),
    _single(
        "sqlite-event-sync-normal",
        Backend.SQLITE,
        "sqlite-event with SQLite synchronous=NORMAL: no fsync per commit, so a 202 survives a"
        " crash of keel but not of the machine; not a default, it shows what the fsync costs",
        (("KEEL_FIREHOSE_SQLITE_SYNCHRONOUS", "NORMAL"),),
    ),
    _batch(
        "sqlite-batch-500",
        Backend.SQLITE,
        Load.BATCH_V7,
        "SQLite (direct buffer), POST /events/batch of 500 events with UUIDv7 ids",
    ),
    _batch(
        "sqlite-batch-500-v4",
        Backend.SQLITE,
        Load.BATCH_V4,
        "the same with random v4 ids: inserts land all over the unique index",
    ),
)
# The PostgreSQL store behind each buffer (the spool's rows go here once it is measured). The
# Redis buffer is measured by the probes below: what matters there is the drain, not one route.
POSTGRES_SCENARIOS: tuple[Scenario, ...] = (*postgres_scenarios("direct"),)
SCENARIOS = (*SQLITE_SCENARIOS, *POSTGRES_SCENARIOS)

_PRELUDE = """\
-- generated by keel bench: {load}
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_usec; }} keel_timeval;
int gettimeofday(keel_timeval *tv, void *tz);
]]
local tv = ffi.new("keel_timeval")
local counter = 0
local random, format, floor = math.random, string.format, math.floor

wrk.headers["Authorization"] = "Bearer {key}"
wrk.headers["Content-Type"] = "application/json"

function setup(thread)
  counter = counter + 1
  thread:set("thread_no", counter)
end

local function now_ms()
  ffi.C.gettimeofday(tv, nil)
  return tonumber(tv.tv_sec) * 1000 + floor(tonumber(tv.tv_usec) / 1000)
end

-- RFC 9562 layout: 48 bits of Unix milliseconds, version 7, 74 random bits.
local function uuid7(ms)
  return format("%08x-%04x-7%03x-%04x-%04x%04x%04x", floor(ms / 65536), ms % 65536,
    random(0, 4095), 32768 + random(0, 16383), random(0, 65535), random(0, 65535),
    random(0, 65535))
end

local function uuid4()
  return format("%04x%04x-%04x-4%03x-%04x-%04x%04x%04x", random(0, 65535), random(0, 65535),
    random(0, 65535), random(0, 4095), 32768 + random(0, 16383), random(0, 65535),
    random(0, 65535), random(0, 65535))
end

local function user()
  return "u" .. random(1, {users})
end
"""

_SINGLE = """\
function init(args)
  math.randomseed(os.time() * 1000 + (thread_no or 0))
end

function request()
  local ms = now_ms()
  local body = '{{"event_id":"' .. uuid7(ms) .. '","user_id":"' .. user() ..
    '","name":"{name}","timestamp":' .. format("%.3f", ms / 1000) ..
    ',"metadata":{{"path":"/p/' .. random(1, 100) .. '","ms":' .. random(1, 999) .. '}}}}'
  return wrk.format("POST", "/events", nil, body)
end
"""

# The body's fixed text is laid out once per thread; a request only fills in ids and times.
_BATCH = """\
local parts = {{}}
local size = {size}

function init(args)
  math.randomseed(os.time() * 1000 + (thread_no or 0))
  for i = 1, size do
    local base = (i - 1) * 5
    parts[base + 1] = (i == 1 and "[" or ",") .. '{{"event_id":"'
    parts[base + 3] = '","user_id":"' .. user() .. '","name":"{name}","timestamp":'
    parts[base + 5] = ',"metadata":{{"path":"/p/' .. random(1, 100) .. '","ms":' ..
      random(1, 999) .. '}}}}'
  end
  parts[size * 5 + 1] = "]"
end

function request()
  local ms = now_ms()
  local stamp = format("%.3f", ms / 1000)
  for i = 1, size do
    local base = (i - 1) * 5
    parts[base + 2] = {make_id}
    parts[base + 4] = stamp
  end
  return wrk.format("POST", "/events/batch", nil, table.concat(parts))
end
"""


def lua_script(load: str, api_key: str, delay_ms: int | None = None) -> str:
    """The wrk script for ``load``: every event is new, with an id of its own. With
    ``delay_ms``, each connection waits that long between its requests: a steady load."""
    prelude = _PRELUDE.format(load=load, key=api_key, users=USERS)
    pause = "" if delay_ms is None else f"\nfunction delay()\n  return {delay_ms}\nend\n"
    if load == Load.EVENT_V7:
        return prelude + _SINGLE.format(name=f"{NAME_PREFIX}1") + pause
    make_id = "uuid4()" if load == Load.BATCH_V4 else "uuid7(ms)"
    body = _BATCH.format(size=BATCH_SIZE, name=f"{NAME_PREFIX}{BATCH_SIZE}", make_id=make_id)
    return prelude + body + pause


_BY_NAME = "SELECT name, count(*), count(DISTINCT event_id) FROM firehose_events GROUP BY name"


def _counts_by_name(database_url: str) -> list[tuple[str | None, int, int]]:
    from keel.bench.stage import fetch_rows

    return [(row[0], int(row[1]), int(row[2])) for row in fetch_rows(database_url, _BY_NAME)]


def _per_request(name: str | None) -> int | None:
    if name is None or not name.startswith(NAME_PREFIX):
        return None
    size = name.removeprefix(NAME_PREFIX)
    return int(size) if size.isdigit() and int(size) > 0 else None


class FirehoseWorkload:
    """Nothing to seed; fresh events on every request; the stored events counted back."""

    def seed(self, base_url: str, api_key: str, count: int) -> list[int]:
        return []

    def lua_script(self, scenario: Scenario, ids: list[int], api_key: str) -> str:
        return lua_script(scenario.load, api_key)

    def count_writes(self, database_url: str) -> int | None:
        """Requests whose events are stored: events / the events each request carried.

        The runner holds this against the 2xx answers wrk counted (every 202'd request stored,
        at most the requests in flight when wrk stopped more).
        """
        stored = 0
        for name, events, _ in _counts_by_name(database_url):
            size = _per_request(name)
            stored += events // size if size else events
        return stored

    def audit(self, database_url: str, log: Path) -> bool | None:
        """Every event stored once, and every batch whole: no id twice, and each name's count a
        multiple of its batch size (a batch is one 202, stored all or nothing)."""
        counts = _counts_by_name(database_url)
        ok = True
        with log.open("a") as out:
            for name, events, distinct in counts:
                size = _per_request(name) or 1
                whole = events % size == 0
                out.write(f"audit: {name}: {events} events, {distinct} distinct ids, "
                          f"{'whole batches' if whole else 'A PARTIAL BATCH'}\n")  # fmt: skip
                ok = ok and whole and distinct == events and _per_request(name) is not None
        return ok


PROBES: tuple[Probe, ...] = (
    Probe(
        name="redis-drain-2m",
        backend=Backend.POSTGRES,
        summary=(
            f"a Redis stream holding {DRAIN_EVENTS:,} events (entries of {ENTRY_EVENTS}, as"
            f" batches of {BATCH_SIZE} make them) drained by `keel serve firehose` with the Redis"
            f" buffer, writers at their default settings, into a table already holding"
            f" {PREFILLED:,}; timed from the writers' first read until the stream is empty. Each"
            " writer (one per worker process) is one connection doing one COPY straight into the"
            " table a batch (through a staging table and INSERT … ON CONFLICT DO NOTHING only"
            " when an id is stored already), reading its next batch meanwhile. *CPU*: cores over"
            " the drain, and server, db"
            " and Redis CPU together per event"
        ),
        measure="keel.firehose.bench_drain:measure_drain",
    ),
    Probe(
        name="redis-sustained-batch-500",
        backend=Backend.POSTGRES,
        summary=(
            f"`keel serve firehose` with the Redis buffer under POST /events/batch of {BATCH_SIZE}"
            f" from wrk: first about {SUSTAINED_EVENTS:,} events/s (each connection pausing"
            " between batches) for runs x duration seconds, then with no pause for as long again"
            " (`redis-overload-rss`: more than the server takes, so the buffer fills to its bound"
            " and answers 503). The backlog (depth), the stream's memory (MEMORY USAGE), Redis's"
            " used_memory and every server process's RSS are sampled throughout; afterwards every"
            " 202'd event is in the table once"
        ),
        measure="keel.firehose.bench_sustained:measure_sustained",
        default_workers=2,
    ),
)

BENCH = ServiceBench(
    service="firehose",
    scenarios=SCENARIOS,
    workload=FirehoseWorkload(),
    load_text=(
        "Every event is new: wrk's Lua makes its id (UUIDv7 unless the row says v4), spreads"
        f" events over {USERS:,} user ids, and each 202 means the event is durable."
    ),
    checks_text=(
        "the stored events counted in the database afterwards: no event id twice, every batch"
        " stored whole"
    ),
    seeded="",  # every request brings its own events
    items="events",
    probes=PROBES,
)
