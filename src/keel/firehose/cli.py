"""``keel firehose …``: the firehose's own commands."""

from __future__ import annotations

import asyncio

import typer

from keel.clikit import DatabaseUrl, console, database_url
from keel.firehose.registration import SERVICE

app = typer.Typer(help="Firehose operations.", no_args_is_help=True)
dead_letters = typer.Typer(help="Events the store refused.", no_args_is_help=True)
app.add_typer(dead_letters, name="dead-letters")


@dead_letters.command("list")
def list_dead_letters(
    database_url_: DatabaseUrl = None,
    limit: int = typer.Option(50, min=1, max=1000, help="How many, oldest first."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """List dead letters with the store's reason."""
    asyncio.run(_list(database_url(SERVICE, database_url_), limit, as_json))


@dead_letters.command("replay")
def replay_dead_letters(
    database_url_: DatabaseUrl = None,
    limit: int = typer.Option(1000, min=1, max=100_000, help="At most this many, oldest first."),
) -> None:
    """Send dead letters back into the store; those refused again return to the list."""
    asyncio.run(_replay(database_url(SERVICE, database_url_), limit))


async def _list(url: str, limit: int, as_json: bool) -> None:
    from keel.core.database import Database, create_engine
    from keel.firehose.service import list_dead_letters as page_of

    database = Database(create_engine(url))
    try:
        async with database.read() as conn:
            page = await page_of(conn, None, limit)
    finally:
        await database.dispose()
    for letter in page.items:
        if as_json:
            print(letter.model_dump_json())
        else:
            console.print(f"{letter.id}\t{letter.event_id}\t{letter.failed_at}\t{letter.reason}")
    if not as_json:
        console.print(
            f"{len(page.items)} dead letter(s)"
            + (" (more: raise --limit)" if page.next_cursor else "")
        )


async def _replay(url: str, limit: int) -> None:
    """Replays straight into the store (this command runs beside the service, not through it)."""
    from keel.core.database import Database, create_engine
    from keel.firehose.buffers.direct import DirectBuffer
    from keel.firehose.service import last_dead_letter_id
    from keel.firehose.service import replay_dead_letters as replay
    from keel.firehose.settings import FirehoseSettings

    database = Database(create_engine(url))
    buffer = DirectBuffer(database, FirehoseSettings(database_url=url))
    await buffer.start()
    try:
        # What is dead now, once: an event refused again returns as a new dead letter (or the
        # same one, updated), and this run must not chase it.
        async with database.read() as conn:
            up_to = await last_dead_letter_id(conn)
        done, last = 0, None
        while done < limit and up_to is not None:
            replayed, last = await replay(
                database,
                buffer,
                ids=None,
                limit=min(1000, limit - done),
                after_id=last,
                up_to_id=up_to,
            )
            if not replayed:
                break
            done += replayed
    finally:
        await buffer.stop()
        await database.dispose()
    console.print(f"{done} dead letter(s) replayed")
