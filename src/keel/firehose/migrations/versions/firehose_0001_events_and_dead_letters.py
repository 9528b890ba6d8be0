"""events and dead letters

Revision ID: firehose_0001
Revises:
Create Date: 2026-11-26 08:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "firehose_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_EVENT_ID = sa.Uuid(as_uuid=True).with_variant(sa.LargeBinary(16), "sqlite")


def upgrade() -> None:
    op.create_table(
        "firehose_events",
        sa.Column("seq", _ID, autoincrement=True, nullable=False),
        sa.Column("event_id", _EVENT_ID, nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("timestamp_us", sa.BigInteger(), nullable=False),
        sa.Column("original_timestamp_us", sa.BigInteger(), nullable=False),
        sa.Column("sent_at_us", sa.BigInteger(), nullable=True),
        sa.Column("received_at_us", sa.BigInteger(), nullable=False),
        sa.Column(
            "metadata", sa.Text().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_firehose_events")),
        sa.UniqueConstraint("event_id", name=op.f("uq_firehose_events_event_id")),
    )
    op.create_index("ix_firehose_events_timestamp_us", "firehose_events", ["timestamp_us"])
    op.create_index("ix_firehose_events_user_id_seq", "firehose_events", ["user_id", "seq"])
    op.create_table(
        "firehose_dead_letters",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("event_id", _EVENT_ID, nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("failed_at_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_firehose_dead_letters")),
        sa.UniqueConstraint("event_id", name=op.f("uq_firehose_dead_letters_event_id")),
    )


def downgrade() -> None:
    op.drop_table("firehose_dead_letters")
    op.drop_index("ix_firehose_events_user_id_seq", table_name="firehose_events")
    op.drop_index("ix_firehose_events_timestamp_us", table_name="firehose_events")
    op.drop_table("firehose_events")
