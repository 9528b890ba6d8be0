"""``keel prove inventory``: a flash sale against real servers, judged from the database.

Kept light (typer and rich only), since ``keel --help`` reads it; the engine is
:mod:`keel.inventory.proof`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from keel.clikit import console

if TYPE_CHECKING:
    from keel.inventory.proof import ProofResult

TARGET_SECONDS = 2.0  # every one of 1,000 buyers answered within this, on a small machine


def prove(
    buyers: Annotated[int, typer.Option(min=1, help="Buyers, all at once.")] = 1000,
    stock: Annotated[int, typer.Option(min=0, help="Units of the one item on sale.")] = 100,
    processes: Annotated[int, typer.Option(min=1, help="Worker processes per server.")] = 4,
    servers: Annotated[
        int, typer.Option(min=1, help="Separate servers on one database, as separate hosts.")
    ] = 1,
    database_url: Annotated[
        str | None,
        typer.Option(help="A database to prove on (migrated; a new item is made there)."),
    ] = None,
    max_per_user: Annotated[
        int | None, typer.Option(min=1, help="The item's per-user limit.")
    ] = None,
    users: Annotated[
        int | None,
        typer.Option(min=1, help="Buyers share this many user ids; default: one each."),
    ] = None,
    with_reservations: Annotated[
        bool,
        typer.Option(help="One buyer in ten holds then confirms, one releases, one lets it lapse."),
    ] = False,
    retries: Annotated[
        bool, typer.Option(help="Every purchase is sent twice under one Idempotency-Key.")
    ] = False,
    connections: Annotated[
        int, typer.Option(min=1, help="HTTP connections the buyers share, over all servers.")
    ] = 200,
) -> None:
    """Sell one item to many buyers at once over HTTP; check from the database that it was never
    oversold or undersold; exit 1 on any violation."""
    from keel.inventory.proof import Observer, SalePlan, run_proof

    plan = SalePlan(
        buyers, stock, processes, servers, database_url, max_per_user, users,
        with_reservations, retries, connections,
    )  # fmt: skip
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("preparing", total=buyers)

        class Drawn(Observer):
            def status(self, text: str) -> None:
                progress.update(task, description=text)

            def buyer_done(self, done: int, total: int) -> None:
                progress.update(task, completed=done)

        result = run_proof(plan, Drawn())
    console.print(verdict_table(result))
    console.print(sell_out_line(result))
    spread = ", ".join(str(n) for n in result.purchases_by_process)
    console.print(f"purchases served per server process: {spread}")
    if not result.ok:
        console.print("[bold red]VIOLATED[/]: see the rows marked ✗")
        raise typer.Exit(1)
    console.print("[bold green]PROVEN[/]: every invariant holds")


def verdict_table(result: ProofResult) -> Table:
    plan = result.plan
    where = "SQLite (temporary)" if plan.database_url is None else "the given database"
    title = (
        f"{plan.buyers} buyers, {plan.stock} units, {plan.servers} server(s) x"
        f" {plan.processes} process(es), on {where}"
    )
    table = Table(title=title)
    table.add_column("invariant")
    table.add_column("", justify="center")
    table.add_column("from the database")
    for check in result.checks:
        table.add_row(check.name, "[green]✓[/]" if check.ok else "[red]✗[/]", check.detail)
    return table


def sell_out_line(result: ProofResult) -> str:
    seconds = result.record.seconds
    met = "met" if seconds <= TARGET_SECONDS else "missed"
    return (
        f"sell-out: {result.plan.buyers} buyers answered in {seconds:.2f} s, first request to"
        f" last answer (target ≤ {TARGET_SECONDS:g} s: {met})"
    )
