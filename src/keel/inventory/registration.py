"""The inventory's one registration: what keel needs to serve, migrate, command and bench it."""

from __future__ import annotations

from keel.core.chains import MigrationChain
from keel.registry import ServiceEntry

MIGRATIONS = MigrationChain("inventory", "keel.inventory:migrations")

SERVICE = ServiceEntry(
    name="inventory",
    summary="Flash sales: never oversold, never undersold.",
    app_factory="keel.inventory.app:create_app",
    settings="keel.inventory.settings:InventorySettings",
    migrations=MIGRATIONS,
    cli="keel.inventory.cli:app",
    bench="keel.inventory.bench:BENCH",
    prove="keel.inventory.prove:prove",
)
