"""The ``keel`` command line."""

from __future__ import annotations

import asyncio
import os
import tempfile
from enum import StrEnum
from typing import Annotated, Any

import typer
import uvicorn
from rich.console import Console

from keel.bench.command import bench_app
from keel.core import migrate
from keel.core.auth import Scope, create_api_key, hash_key
from keel.core.database import Database, create_engine
from keel.core.settings import DATA_DIR
from keel.registry import SERVICES, ServiceEntry

app = typer.Typer(help="keel: ledger, firehose and inventory services.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
apikey_app = typer.Typer(help="API keys.", no_args_is_help=True)
ledger_app = typer.Typer(help="Ledger operations.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(apikey_app, name="apikey")
app.add_typer(ledger_app, name="ledger")
app.add_typer(bench_app, name="bench")
console = Console()

ServiceName = StrEnum("ServiceName", {name: name for name in SERVICES})  # type: ignore[misc]
DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", help="sqlite:///path or postgresql://…; default from KEEL_*."),
]
DEV_KEY_FILE = DATA_DIR / "dev-admin-key"


def _database_url(entry: ServiceEntry, override: str | None) -> str:
    return override or entry.settings().database_url


def _pin_database_url(entry: ServiceEntry, url: str | None) -> None:
    """Make ``--database-url`` reach worker processes, which read settings from the environment."""
    if url:
        os.environ[f"KEEL_{entry.name.upper()}_DATABASE_URL"] = url


def _prepare_metrics_dir(workers: int) -> None:
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="keel-metrics-")


def _uvicorn_options(host: str, port: int, workers: int) -> dict[str, Any]:
    return {
        "factory": True,
        "host": host,
        "port": port,
        "workers": workers,
        "access_log": False,  # keel logs one line per request itself, with its request id
        "log_level": "warning",
        "timeout_graceful_shutdown": 10,
        "backlog": 4096,
        # Spawned workers re-import keel before answering the supervisor; on a busy machine
        # uvicorn's default 5 s would kill and respawn them in a loop.
        "timeout_worker_healthcheck": 60,
    }


@app.command()
def serve(
    service: Annotated[ServiceName, typer.Argument(help="Which service.")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port; the service's own by default.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    database_url: DatabaseUrl = None,
) -> None:
    """Run one service. On SQLite its migrations run first."""
    entry = SERVICES[service.value]
    _pin_database_url(entry, database_url)
    url = _database_url(entry, database_url)
    if url.startswith("sqlite"):
        asyncio.run(migrate.upgrade(url, entry.name))
    _prepare_metrics_dir(workers)
    port = port or entry.port
    console.print(f"[bold]keel {entry.name}[/] on http://{host}:{port} ({workers} worker(s))")
    uvicorn.run(entry.app_factory, **_uvicorn_options(host, port, workers))


@app.command()
def run(host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1") -> None:
    """Run every service for local use, on SQLite under ./data/, and print a dev admin key."""
    for entry in SERVICES.values():
        asyncio.run(migrate.upgrade(_database_url(entry, None), entry.name))
    key = asyncio.run(_dev_admin_key())
    console.print(f"dev admin API key: [bold green]{key}[/]  (saved in {DEV_KEY_FILE})")
    for entry in SERVICES.values():
        console.print(
            f"  {entry.name:10} http://{host}:{entry.port}   docs: http://{host}:{entry.port}/docs"
        )
    servers = [
        uvicorn.Server(uvicorn.Config(e.app_factory, **_uvicorn_options(host, e.port, 1)))
        for e in SERVICES.values()
    ]

    async def serve_all() -> None:
        await asyncio.gather(*(server.serve() for server in servers))

    asyncio.run(serve_all())


async def _dev_admin_key() -> str:
    """Reuse the saved dev key if every service still knows it; otherwise make a new one."""
    raw = DEV_KEY_FILE.read_text().strip() if DEV_KEY_FILE.exists() else ""
    if raw and all([await _key_exists(e, raw) for e in SERVICES.values()]):
        return raw
    raw = await _create_key_everywhere(
        Scope.ADMIN, "dev admin (make run)", list(SERVICES.values()), None
    )
    DEV_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
    DEV_KEY_FILE.write_text(raw + "\n")
    DEV_KEY_FILE.chmod(0o600)
    return raw


async def _key_exists(entry: ServiceEntry, raw: str) -> bool:
    from sqlalchemy import select

    from keel.core.tables import api_keys

    database = Database(create_engine(_database_url(entry, None)))
    try:
        async with database.read() as conn:
            found = await conn.execute(
                select(api_keys.c.id).where(api_keys.c.key_hash == hash_key(raw))
            )
            return found.first() is not None
    finally:
        await database.dispose()


async def _create_key_everywhere(
    scope: Scope, name: str, entries: list[ServiceEntry], database_url: str | None
) -> str:
    raw: str | None = None
    seen: set[str] = set()
    for entry in entries:
        url = _database_url(entry, database_url)
        if url in seen:  # services sharing one database share its key table
            continue
        seen.add(url)
        await migrate.upgrade(url, entry.name)
        database = Database(create_engine(url))
        try:
            async with database.write() as conn:
                raw = await create_api_key(conn, scope=scope, name=name, raw_key=raw)
        finally:
            await database.dispose()
    assert raw is not None
    return raw


@db_app.command("upgrade")
def db_upgrade(
    service: Annotated[
        ServiceName | None, typer.Argument(help="One service; all by default.")
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Apply migrations (core tables, then the service's own)."""
    entries = [SERVICES[service.value]] if service else list(SERVICES.values())
    for entry in entries:
        url = _database_url(entry, database_url)
        asyncio.run(migrate.upgrade(url, entry.name))
        console.print(f"{entry.name}: schema up to date")


@apikey_app.command("create")
def apikey_create(
    scope: Annotated[Scope, typer.Option(help="read, write or admin.")],
    service: Annotated[
        ServiceName | None, typer.Option(help="One service; all by default.")
    ] = None,
    name: Annotated[str, typer.Option(help="A note on who holds the key.")] = "",
    database_url: DatabaseUrl = None,
) -> None:
    """Create an API key and print it. It is shown this once; only its hash is stored."""
    entries = [SERVICES[service.value]] if service else list(SERVICES.values())
    raw = asyncio.run(_create_key_everywhere(scope, name, entries, database_url))
    typer.echo(raw)


@ledger_app.command("audit")
def ledger_audit(database_url: DatabaseUrl = None) -> None:
    """Check every balance against the sum of its entries; exit 1 on any mismatch."""
    from keel.ledger.service import audit

    async def check() -> bool:
        database = Database(create_engine(_database_url(SERVICES["ledger"], database_url)))
        try:
            async with database.read() as conn:
                report = await audit(conn)
        finally:
            await database.dispose()
        for bad in report.mismatches:
            console.print(
                f"[red]user {bad.user_id}: balance {bad.balance}"
                f" != {bad.entries_sum}, the sum of its {bad.entries} entries"
            )
        colour = "green" if report.ok else "red"
        console.print(
            f"[{colour}]{report.accounts_checked} accounts checked,"
            f" {len(report.mismatches)} mismatched"
        )
        return report.ok

    if not asyncio.run(check()):
        raise typer.Exit(1)
