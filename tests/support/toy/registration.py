"""The toy service's one registration."""

from __future__ import annotations

from keel.core.chains import MigrationChain
from keel.registry import ServiceEntry

MIGRATIONS = MigrationChain("toy", "tests.support.toy:migrations")

SERVICE = ServiceEntry(
    name="toy",
    summary="Notes, for the platform's tests.",
    app_factory="tests.support.toy.app:create_app",
    settings="tests.support.toy.app:ToySettings",
    migrations=MIGRATIONS,
    cli="tests.support.toy.cli:app",
    bench="tests.support.toy.bench:BENCH",
    prove="tests.support.toy.prove:prove",
)
