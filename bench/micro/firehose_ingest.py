"""Micro-benchmark: server CPU µs per firehose ingest request, in process, no HTTP server.

Run with ``uv run python bench/micro/firehose_ingest.py [--profile out.prof]``. The firehose app
(SQLite, direct buffer, access log on as shipped but written to a file) is called through ASGI
by ``CONCURRENCY`` tasks at once, so group commit batches as it does under wrk; beside it the
reference no-op app through the same path. Time is this process's CPU time, so other processes'
load does not count; variants alternate round by round and medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from keel.core.auth import Scope, create_api_key
from keel.core.database import Database, create_engine
from keel.core.migrate import upgrade
from keel.core.uuid7 import uuid7

CONCURRENCY = 64
ROUNDS = 5
BATCH = 500


def _event(n: int) -> dict[str, Any]:
    return {
        "event_id": str(uuid7()),  # as keel's client makes them
        "user_id": f"u{random.randrange(10_000)}",
        "name": "bench.1",
        "timestamp": time.time(),
        "metadata": {"path": f"/p/{n % 100}", "ms": n % 999},
    }


def _scope(path: str, key: str, length: int) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(length).encode()),
        ],
    }


async def _call(app: Any, path: str, key: str, body: bytes) -> int:
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(path, key, len(body)), receive, send)
    return status


async def _drive(app: Any, path: str, key: str, bodies: Callable[[int], bytes], n: int) -> float:
    """CPU µs per request over ``n`` requests, ``CONCURRENCY`` at a time."""
    queue = iter(range(n))
    prepared = [bodies(i) for i in range(n)]

    async def worker() -> None:
        for i in queue:
            status = await _call(app, path, key, prepared[i])
            assert status in (200, 202), status

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return (time.process_time() - started) / n * 1e6


async def _database(directory: Path, chains: list[Any], name: str) -> tuple[str, str]:
    url = f"sqlite:///{directory / name}.db"
    await upgrade(url, chains)
    database = Database(create_engine(url))
    async with database.write() as conn:
        key = await create_api_key(conn, scope=Scope.ADMIN, name="bench")
    await database.dispose()
    return url, key


async def main(profile: str | None, only: str | None, drop_index: str | None) -> None:
    from keel.bench.reference import ReferenceSettings, noop_app
    from keel.core.observability import configure_logging
    from keel.firehose.app import create_app
    from keel.firehose.registration import MIGRATIONS
    from keel.firehose.settings import FirehoseSettings

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        log = (directory / "access.log").open("w")
        stdout, sys.stdout = sys.stdout, log  # the access log as the server writes it, to a file
        configure_logging("text", "info")
        sys.stdout = stdout
        fh_url, fh_key = await _database(directory, [MIGRATIONS], "firehose")
        if drop_index:  # what an index costs: measure without it
            with sqlite3.connect(fh_url.split(":///", 1)[1]) as conn:
                conn.execute(f"DROP INDEX {drop_index}")
        ref_url, ref_key = await _database(directory, [], "ref")
        settings = FirehoseSettings(database_url=fh_url, rate_limit="1000000000/second")
        firehose = create_app(settings)
        noop = noop_app(ReferenceSettings(database_url=ref_url, rate_limit="1000000000/second"))
        single = lambda i: json.dumps(_event(i)).encode()  # noqa: E731
        batch = lambda i: json.dumps([_event(i * BATCH + j) for j in range(BATCH)]).encode()  # noqa: E731
        variants = {
            "noop (reference)": (noop, "/noop", ref_key, lambda i: b"{}", 20_000, 1),
            "POST /events (single)": (firehose, "/events", fh_key, single, 20_000, 1),
            "POST /events/batch x500": (firehose, "/events/batch", fh_key, batch, 200, BATCH),
        }
        if only:
            variants = {k: v for k, v in variants.items() if k.startswith(only)}
        async with firehose.router.lifespan_context(firehose), noop.router.lifespan_context(noop):
            for app, path, key, bodies, _, _ in variants.values():
                await _drive(app, path, key, bodies, 500)  # warm caches and the key
            profiler = cProfile.Profile() if profile else None
            samples: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(ROUNDS):
                for name, (app, path, key, bodies, n, _) in variants.items():
                    if profiler:
                        profiler.enable()
                    samples[name].append(await _drive(app, path, key, bodies, n))
                    if profiler:
                        profiler.disable()
            if profiler and profile:
                profiler.dump_stats(profile)
    print(f"python {sys.version.split()[0]}; {ROUNDS} rounds; CPU µs per request (median)")
    for name, values in samples.items():
        per_item = variants[name][5]
        extra = f"  = {statistics.median(values) / per_item:.2f} µs/event" if per_item > 1 else ""
        print(f"  {name:28s} {statistics.median(values):9.1f}{extra}"
              f"   (rounds {min(values):.1f}..{max(values):.1f})")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", help="write cProfile stats here")
    parser.add_argument("--only", help="run only variants whose name starts with this")
    parser.add_argument("--drop-index", help="drop this index of firehose_events first")
    args = parser.parse_args()
    os.environ.setdefault("KEEL_ENV", "dev")
    asyncio.run(main(args.profile, args.only, args.drop_index))
