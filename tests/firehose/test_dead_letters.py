"""Events the store refuses become dead letters with its reason; replay sends them back."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from keel.cli import app as cli
from keel.core.database import Database
from keel.firehose.events import EventRow, now_us
from keel.firehose.store import dead_letter
from tests.firehose.test_ingest import stored

# PostgreSQL's jsonb refuses \u0000 (SQLSTATE 22P05); SQLite stores it. So dead letters from
# the store's own refusal are a PostgreSQL story; replay and listing are tested on both.
NUL_METADATA = b'{"user_id":"dl","timestamp":%d,"event_id":"%s","metadata":{"k":"a\\u0000b"}}'


def valid_row(user: str = "replayed") -> EventRow:
    return EventRow(uuid.uuid4(), user, "x", now_us(), now_us(), None, now_us(), '{"a": 1}')


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_an_event_the_store_refuses_is_dead_lettered_with_its_reason(
    firehose: httpx.AsyncClient, database: Database, drained: Any
) -> None:
    refused, fine = str(uuid.uuid4()), str(uuid.uuid4())
    batch = b"[%s,%s]" % (
        NUL_METADATA % (int(time.time()), refused.encode()),
        json.dumps({"user_id": "dl", "timestamp": time.time(), "event_id": fine}).encode(),
    )
    reply = await firehose.post(
        "/events/batch", content=batch, headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 202 and reply.json()["accepted"] == 2  # both durable
    await drained()
    assert await stored(database, refused, fine) == {refused: 0, fine: 1}
    letters = await all_dead_letters(firehose)
    [letter] = [d for d in letters if d["event_id"] == refused]
    assert letter["reason"].startswith("22P05")  # the store's own words
    assert letter["event"]["metadata"] == '{"k":"a\\u0000b"}'
    health = (await firehose.get("/health")).json()
    assert health["dead_letters"] >= 1

    # Replayed, it is refused again and comes back as a new dead letter; nothing is lost.
    reply = await firehose.post("/dead-letters/replay", json={"ids": [letter["id"]]})
    assert reply.status_code == 200 and reply.json() == {"replayed": 1}
    await drained()
    [again] = [d for d in await all_dead_letters(firehose) if d["event_id"] == refused]
    assert again["failed_at"] > letter["failed_at"]  # refused again, and kept once
    assert await stored(database, refused) == {refused: 0}


async def test_replay_stores_what_the_store_now_takes(
    firehose: httpx.AsyncClient, database: Database, drained: Any
) -> None:
    row = valid_row()
    await dead_letter(database, row, "08006: connection lost (simulated transient refusal)")
    letters = [d for d in await all_dead_letters(firehose) if d["event_id"] == str(row.event_id)]
    assert len(letters) == 1
    reply = await firehose.post("/dead-letters/replay", json={"ids": [letters[0]["id"]]})
    assert reply.json() == {"replayed": 1}
    await drained()
    assert await stored(database, str(row.event_id)) == {str(row.event_id): 1}
    assert not [d for d in await all_dead_letters(firehose) if d["event_id"] == str(row.event_id)]
    # A second replay of the same id finds nothing and stores nothing twice.
    reply = await firehose.post("/dead-letters/replay", json={"ids": [letters[0]["id"]]})
    assert reply.json() == {"replayed": 0}


@pytest.mark.parametrize(
    "body",
    [{"limit": True}, {"limit": 1.0}, {"limit": "5"}, {"ids": [True]}, {"ids": ["1"]}],
    ids=["limit-true", "limit-float", "limit-string", "id-true", "id-string"],
)
async def test_replay_refuses_what_is_not_an_integer(
    firehose: httpx.AsyncClient, database: Database, body: dict[str, Any]
) -> None:
    """JSON true is not 1, nor "1" an id: the schema says integer (found by the fuzzer)."""
    row = valid_row("not-replayed")
    await dead_letter(database, row, "08006: connection lost (simulated transient refusal)")
    reply = await firehose.post("/dead-letters/replay", json=body)
    assert (reply.status_code, reply.json()["code"]) == (422, "validation_error"), reply.text
    assert [d for d in await all_dead_letters(firehose) if d["event_id"] == str(row.event_id)]


async def test_replay_needs_an_admin_key(firehose_app: Any, make_key: Any) -> None:
    from keel.core.auth import Scope

    key = await make_key(Scope.WRITE)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=firehose_app), base_url="http://t"
    ) as c:
        reply = await c.post("/dead-letters/replay", headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 403


async def test_cli_lists_and_replays(database: Database, database_url: str) -> None:
    rows = [valid_row("cli") for _ in range(3)]
    for row in rows:
        await dead_letter(database, row, "simulated")
    runner = CliRunner()
    listed = await asyncio.to_thread(
        runner.invoke,
        cli,
        [
            "firehose",
            "dead-letters",
            "list",
            "--database-url",
            database_url,
            "--json",
            "--limit",
            "1000",
        ],
    )
    assert listed.exit_code == 0, listed.output
    ids = {
        json.loads(line)["event_id"] for line in listed.output.splitlines() if line.startswith("{")
    }
    assert {str(r.event_id) for r in rows} <= ids
    replayed = await asyncio.to_thread(
        runner.invoke, cli, ["firehose", "dead-letters", "replay", "--database-url", database_url]
    )
    assert replayed.exit_code == 0, replayed.output
    assert "replayed" in replayed.output
    assert set((await stored(database, *[str(r.event_id) for r in rows])).values()) == {1}


async def all_dead_letters(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    found, cursor = [], None
    while True:
        page = (
            await client.get(
                "/dead-letters", params={"limit": 100} | ({"cursor": cursor} if cursor else {})
            )
        ).json()
        found += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return found
