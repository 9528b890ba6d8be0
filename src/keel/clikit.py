"""What the ``keel`` CLI shares with the services' own command groups and the bench.

Kept light: importing it loads typer and rich, not the apps, SQLAlchemy or Alembic.
"""

from __future__ import annotations

import os
import socket
import tempfile
from contextlib import ExitStack
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from keel.registry import ServiceEntry

console = Console()

DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", help="sqlite:///path or postgresql://…; default from KEEL_*."),
]


def database_url(entry: ServiceEntry, override: str | None) -> str:
    """``--database-url`` if given, else the service's settings (``KEEL_<NAME>_DATABASE_URL``…)."""
    return override or entry.settings_class()().database_url


def pin_database_url(entry: ServiceEntry, url: str | None) -> None:
    """Make ``--database-url`` reach worker processes, which read settings from the environment."""
    if url:
        os.environ[f"KEEL_{entry.name.upper()}_DATABASE_URL"] = url


def prepare_metrics_dir(workers: int) -> None:
    """Several workers share their Prometheus counters through files in one directory."""
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="keel-metrics-")


def uvicorn_options(host: str, port: int, workers: int) -> dict[str, Any]:
    """How keel runs uvicorn, for services and the bench's reference apps alike."""
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
        # One write per response, not two (keel.core.http_protocol): imported by its path, so
        # that `keel --help` does not load uvicorn.
        "http": "keel.core.http_protocol:CoalescingHttpToolsProtocol",
    }


def run_uvicorn(app: str, host: str, port: int, workers: int, *, reuse_port: bool = True) -> None:
    """Serve ``app`` (``module:factory``) as keel does: in this process, or from a supervisor with
    ``workers`` worker processes, each listening on a socket of its own (:mod:`keel.listen`)
    unless ``reuse_port`` is off or the platform cannot spread connections that way."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from keel.listen import claimed, spreads_connections

    options = uvicorn_options(host, port, workers)
    if workers == 1 or not reuse_port or not spreads_connections():
        uvicorn.run(app, **options)
        return
    config = uvicorn.Config(app, **options)  # sets up uvicorn's logging, as uvicorn.run does
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with ExitStack() as held:
        try:
            sock = held.enter_context(claimed(family, host, port))
        except OSError as exc:
            console.print(f"[red]cannot listen on {host}:{port}: {exc.strerror}[/]")
            raise typer.Exit(1) from None
        supervisor = Multiprocess(config, sockets=[sock])
        supervisor.run()
    if any(worker.exitcode == STARTUP_FAILURE for worker in supervisor.processes):
        raise typer.Exit(STARTUP_FAILURE)  # uvicorn stopped because a worker could not start
