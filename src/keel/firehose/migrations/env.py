"""Alembic environment for the firehose chain."""

from alembic import context

from keel.core.migrate import run_env
from keel.firehose.tables import metadata

run_env(context, metadata)
