"""``keel ledger …``: the ledger's own commands."""

from __future__ import annotations

import asyncio

import typer

from keel.clikit import DatabaseUrl, console, database_url
from keel.ledger.registration import SERVICE

app = typer.Typer(help="Ledger operations.", no_args_is_help=True)


@app.command("audit")
def audit(database_url_: DatabaseUrl = None) -> None:
    """Check every balance against the sum of its entries; exit 1 on any mismatch."""
    if not asyncio.run(_audit(database_url(SERVICE, database_url_))):
        raise typer.Exit(1)


async def _audit(url: str) -> bool:
    from keel.core.database import Database, create_engine
    from keel.ledger.service import audit as audit_books

    database = Database(create_engine(url))
    try:
        async with database.read() as conn:
            report = await audit_books(conn)
    finally:
        await database.dispose()
    for bad in report.mismatches:
        console.print(
            f"[red]user {bad.user_id}: balance {bad.balance}"
            f" != {bad.entries_sum}, the sum of its {bad.entries} entries"
        )
    colour = "green" if report.ok else "red"
    console.print(
        f"[{colour}]{report.accounts_checked} accounts checked, {len(report.mismatches)} mismatched"
    )
    return report.ok
