"""drop the per-user index: ingest over reads

Revision ID: firehose_0002
Revises: firehose_0001
Create Date: 2026-11-26 11:00:00

The (user_id, seq) index took more than half of SQLite's insert cost (measured: 9.1 µs an event
with it, 4.7 µs without), and the share grows with the table, since events of 10,000 users land
on scattered pages of it. ``GET /events?user_id=`` now scans a bounded window of the newest
events per page instead (see keel.firehose.service.list_events).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "firehose_0002"
down_revision: str | None = "firehose_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_firehose_events_user_id_seq", table_name="firehose_events")


def downgrade() -> None:
    op.create_index("ix_firehose_events_user_id_seq", "firehose_events", ["user_id", "seq"])
