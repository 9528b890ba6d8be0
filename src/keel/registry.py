"""The services keel runs. A new service is its package plus one line in :data:`REGISTERED`.

Each service declares itself once, as a :class:`ServiceEntry` in its own package: its app factory,
settings, migration chain, CLI group, bench scenarios and proof. The entry names them by import
path, so reading the registry (as ``keel --help`` does) imports no app, database driver or Alembic.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from keel.core.chains import MigrationChain

if TYPE_CHECKING:
    from collections.abc import Callable

    import typer

    from keel.bench.scenarios import ServiceBench
    from keel.core.settings import ServiceSettings

REGISTERED: tuple[str, ...] = (
    "keel.ledger.registration:SERVICE",
    "keel.firehose.registration:SERVICE",
    "keel.inventory.registration:SERVICE",
)  # fmt: skip


def load(reference: str) -> Any:
    """The object at ``"package.module:attribute"``."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class ServiceEntry:
    """Everything keel needs to serve, migrate, command and bench one service."""

    name: str
    summary: str  # one line, for ``keel --help``
    app_factory: str  # "module:function", a zero-argument app factory (uvicorn --factory)
    settings: str  # "module:Class", a ServiceSettings subclass
    migrations: MigrationChain  # the service's own chain; the core chain always runs first
    cli: str | None = None  # "module:attribute", a typer app mounted as ``keel <name> …``
    bench: str | None = None  # "module:attribute", a ServiceBench for ``keel bench <name>``
    prove: str | None = None  # "module:attribute", a typer command run as ``keel prove <name>``

    def settings_class(self) -> type[ServiceSettings]:
        cls: type[ServiceSettings] = load(self.settings)
        return cls

    @property
    def port(self) -> int:
        return self.settings_class().default_port

    def load_cli(self) -> typer.Typer | None:
        return None if self.cli is None else load(self.cli)

    def load_bench(self) -> ServiceBench | None:
        return None if self.bench is None else load(self.bench)

    def load_prove(self) -> Callable[..., None] | None:
        return None if self.prove is None else load(self.prove)


@cache
def services() -> dict[str, ServiceEntry]:
    """Every registered service by name, in registration order."""
    entries = [load(reference) for reference in REGISTERED]
    found: dict[str, ServiceEntry] = {}
    for entry in entries:
        if not isinstance(entry, ServiceEntry):
            raise TypeError(f"{entry!r} is not a ServiceEntry")
        if entry.name in found:
            raise ValueError(f"service {entry.name!r} is registered twice")
        found[entry.name] = entry
    return found
