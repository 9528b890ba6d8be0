"""Alembic environment for the ledger chain."""

from alembic import context

from keel.core.migrate import run_env
from keel.ledger.tables import metadata

run_env(context, metadata)
