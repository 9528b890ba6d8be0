"""The ledger's one registration: what keel needs to serve, migrate, command and bench it."""

from __future__ import annotations

from keel.core.chains import MigrationChain
from keel.registry import ServiceEntry

MIGRATIONS = MigrationChain("ledger", "keel.ledger:migrations")

SERVICE = ServiceEntry(
    name="ledger",
    summary="Accounts and money: every balance equals the sum of its entries.",
    app_factory="keel.ledger.app:create_app",
    settings="keel.ledger.settings:LedgerSettings",
    migrations=MIGRATIONS,
    cli="keel.ledger.cli:app",
    bench="keel.ledger.bench:BENCH",
)
