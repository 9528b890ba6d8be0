"""``keel toy …``: the toy service's own command group."""

from __future__ import annotations

import asyncio

import typer
from sqlalchemy import func, select

from keel.clikit import DatabaseUrl, console, database_url
from keel.core.database import Database, create_engine
from tests.support.toy.registration import SERVICE
from tests.support.toy.tables import notes

app = typer.Typer(help="Toy operations.", no_args_is_help=True)


@app.command("count")
def count(database_url_: DatabaseUrl = None) -> None:
    """Print how many notes the database holds."""
    console.print(f"{asyncio.run(_count(database_url(SERVICE, database_url_)))} notes")


async def _count(url: str) -> int:
    database = Database(create_engine(url))
    try:
        async with database.read() as conn:
            return int((await conn.execute(select(func.count()).select_from(notes))).scalar_one())
    finally:
        await database.dispose()
