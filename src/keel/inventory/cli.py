"""``keel inventory …``: the inventory's own commands."""

from __future__ import annotations

import asyncio

import typer

from keel.clikit import DatabaseUrl, console, database_url
from keel.inventory.registration import SERVICE

app = typer.Typer(help="Inventory operations.", no_args_is_help=True)


@app.command("audit")
def audit(database_url_: DatabaseUrl = None) -> None:
    """Check every item's counts against its orders and holds; exit 1 on any mismatch."""
    if not asyncio.run(_audit(database_url(SERVICE, database_url_))):
        raise typer.Exit(1)


async def _audit(url: str) -> bool:
    from keel.core.database import Database, create_engine
    from keel.inventory.audit import audit_stock

    database = Database(create_engine(url))
    try:
        async with database.read() as conn:
            report = await conn.run_sync(audit_stock)
    finally:
        await database.dispose()
    for problem in report.problems:
        console.print(f"[red]{problem}")
    colour = "green" if report.ok else "red"
    console.print(
        f"[{colour}]{report.items_checked} items checked, {len(report.problems)} problems"
    )
    return report.ok
