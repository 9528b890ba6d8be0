"""``keel prove toy``: the toy's proof, a command that checks the notes it is told to expect."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from keel.clikit import DatabaseUrl, console, database_url
from tests.support.toy.cli import _count
from tests.support.toy.registration import SERVICE


def prove(
    notes: Annotated[int, typer.Option(help="How many notes the database must hold.")] = 0,
    database_url_: DatabaseUrl = None,
) -> None:
    """Check that the database holds exactly the notes expected; exit 1 if not."""
    found = asyncio.run(_count(database_url(SERVICE, database_url_)))
    console.print(f"{found} notes, {notes} expected")
    if found != notes:
        raise typer.Exit(1)
