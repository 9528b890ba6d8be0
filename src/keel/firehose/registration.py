"""The firehose's one registration: what keel needs to serve, migrate, command and bench it."""

from __future__ import annotations

from keel.core.chains import MigrationChain
from keel.registry import ServiceEntry

MIGRATIONS = MigrationChain("firehose", "keel.firehose:migrations")

SERVICE = ServiceEntry(
    name="firehose",
    summary="Event ingestion: an acknowledged event is never lost.",
    app_factory="keel.firehose.app:create_app",
    settings="keel.firehose.settings:FirehoseSettings",
    migrations=MIGRATIONS,
    cli="keel.firehose.cli:app",
    bench="keel.firehose.bench:BENCH",
)
