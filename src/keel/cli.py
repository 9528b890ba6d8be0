"""The ``keel`` command line, built from the registry.

Every registered service gets ``keel serve <name>``, ``keel db upgrade <name>``, API keys in its
database, ``keel bench <name>`` if it declares scenarios, ``keel prove <name>`` if it declares a
proof, and its own group (``keel <name> …``).
Nothing here names a service. Heavy modules (uvicorn, SQLAlchemy, Alembic) load inside commands,
so ``keel --help`` stays quick.
"""

# No ``from __future__ import annotations``: typer reads the commands' annotations at run time,
# and they name the service enum built inside build_app.
import asyncio
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated

import typer

from keel.bench.command import bench_app
from keel.clikit import (
    DatabaseUrl,
    console,
    database_url,
    pin_database_url,
    prepare_metrics_dir,
    run_uvicorn,
    uvicorn_options,
)
from keel.registry import ServiceEntry, services

SCOPES = ("read", "write", "admin")  # keel.core.auth.Scope, checked there when a key is made


def build_app(entries: Mapping[str, ServiceEntry]) -> typer.Typer:
    """The whole CLI for these services."""
    cli = typer.Typer(
        help=f"keel: the {', '.join(entries)} service(s) on one core.", no_args_is_help=True
    )
    names = StrEnum("ServiceName", {name: name for name in entries})  # type: ignore[misc]
    _add_serving(cli, entries, names)
    cli.add_typer(_db_app(entries, names), name="db")
    cli.add_typer(_apikey_app(entries, names), name="apikey")
    cli.add_typer(bench_app(entries), name="bench")
    proofs = _prove_app(entries)
    if proofs is not None:
        cli.add_typer(proofs, name="prove")
    for entry in entries.values():
        group = entry.load_cli()
        if group is not None:
            cli.add_typer(group, name=entry.name, help=entry.summary)
    return cli


def _prove_app(entries: Mapping[str, ServiceEntry]) -> typer.Typer | None:
    """``keel prove <name>``: each service's proof of its property against real processes."""
    prove = typer.Typer(
        help="Prove a service's property against real server processes.", no_args_is_help=True
    )
    found = False
    for entry in entries.values():
        command = entry.load_prove()
        if command is not None:
            about = " ".join((command.__doc__ or entry.summary).split())
            prove.command(name=entry.name, help=about)(command)
            found = True
    return prove if found else None


def _add_serving(cli: typer.Typer, entries: Mapping[str, ServiceEntry], names: type) -> None:
    @cli.command()
    def serve(
        service: Annotated[names, typer.Argument(help="Which service.")],  # type: ignore[valid-type]
        host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
        port: Annotated[
            int | None,
            typer.Option(min=1, max=65535, help="Port; the service's own by default."),
        ] = None,
        workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
        database_url_: DatabaseUrl = None,
        reuse_port: Annotated[
            bool,
            typer.Option(
                help="Each worker listens on a socket of its own and the kernel spreads"
                " connections evenly (Linux); --no-reuse-port: one shared socket."
            ),
        ] = True,
    ) -> None:
        """Run one service. On SQLite its migrations run first."""
        from keel.core import migrate

        entry = entries[str(service)]
        pin_database_url(entry, database_url_)
        url = database_url(entry, database_url_)
        if url.startswith("sqlite"):
            asyncio.run(migrate.upgrade(url, [entry.migrations]))
        prepare_metrics_dir(workers)
        port = port or entry.port
        console.print(f"[bold]keel {entry.name}[/] on http://{host}:{port} ({workers} worker(s))")
        run_uvicorn(entry.app_factory, host, port, workers, reuse_port=reuse_port)

    @cli.command()
    def run(host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1") -> None:
        """Run every service for local use, on SQLite under ./data/, and print a dev admin key."""
        from keel.devkeys import DEV_KEY_FILE, dev_admin_key, upgrade_all

        asyncio.run(upgrade_all(list(entries.values())))
        key = asyncio.run(dev_admin_key(list(entries.values())))
        console.print(f"dev admin API key: [bold green]{key}[/]  (saved in {DEV_KEY_FILE})")
        for e in entries.values():
            console.print(
                f"  {e.name:10} http://{host}:{e.port}   docs: http://{host}:{e.port}/docs"
            )
        asyncio.run(_serve_all(list(entries.values()), host))


async def _serve_all(entries: list[ServiceEntry], host: str) -> None:
    import uvicorn

    servers = [
        uvicorn.Server(uvicorn.Config(e.app_factory, **uvicorn_options(host, e.port, 1)))
        for e in entries
    ]
    await asyncio.gather(*(server.serve() for server in servers))


def _chosen(entries: Mapping[str, ServiceEntry], service: StrEnum | None) -> list[ServiceEntry]:
    return [entries[str(service)]] if service else list(entries.values())


def _db_app(entries: Mapping[str, ServiceEntry], names: type) -> typer.Typer:
    db = typer.Typer(help="Database schema.", no_args_is_help=True)

    @db.command("upgrade")
    def upgrade(
        service: Annotated[
            names | None,  # type: ignore[valid-type]
            typer.Argument(help="One service; all by default."),
        ] = None,
        database_url_: DatabaseUrl = None,
    ) -> None:
        """Apply migrations (core tables, then the service's own)."""
        from keel.core import migrate

        for entry in _chosen(entries, service):
            url = database_url(entry, database_url_)
            asyncio.run(migrate.upgrade(url, [entry.migrations]))
            console.print(f"{entry.name}: schema up to date")

    return db


def _apikey_app(entries: Mapping[str, ServiceEntry], names: type) -> typer.Typer:
    apikey = typer.Typer(help="API keys.", no_args_is_help=True)

    @apikey.command("create")
    def create(
        scope: Annotated[str, typer.Option(help="read, write or admin.")],
        service: Annotated[
            names | None,  # type: ignore[valid-type]
            typer.Option(help="One service; all by default."),
        ] = None,
        name: Annotated[str, typer.Option(help="A note on who holds the key.")] = "",
        database_url_: DatabaseUrl = None,
    ) -> None:
        """Create an API key and print it. It is shown this once; only its hash is stored."""
        from keel.core.auth import Scope
        from keel.devkeys import create_key_everywhere

        if scope not in SCOPES:
            raise typer.BadParameter(f"choose from {', '.join(SCOPES)}", param_hint="--scope")
        chosen = _chosen(entries, service)
        raw = asyncio.run(create_key_everywhere(Scope(scope), name, chosen, database_url_))
        typer.echo(raw)

    return apikey


app = build_app(services())
