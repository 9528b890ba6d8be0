"""Alembic environment for the inventory chain."""

from alembic import context

from keel.core.migrate import run_env
from keel.inventory.tables import metadata

run_env(context, metadata)
