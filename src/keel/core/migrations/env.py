"""Alembic environment for the core chain (API keys, idempotency, outbox, maintenance)."""

from alembic import context

import keel.core.outbox.tables  # noqa: F401 - registers the outbox tables in the metadata
from keel.core.migrate import run_env
from keel.core.tables import metadata

run_env(context, metadata)
