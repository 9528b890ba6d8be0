"""Alembic environment for the toy chain."""

from alembic import context

from keel.core.migrate import run_env
from tests.support.toy.tables import metadata

run_env(context, metadata)
