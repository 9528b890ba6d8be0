"""Alembic environment for the core chain (API keys, idempotency records)."""

from alembic import context

from keel.core.migrate import run_env
from keel.core.tables import metadata

run_env(context, metadata)
