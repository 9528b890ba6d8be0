"""api keys and idempotency records

Revision ID: core_0001
Revises:
Create Date: 2026-11-24 10:49:51.204475
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "core_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "keel_api_keys",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_keel_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_keel_api_keys_key_hash")),
    )
    op.create_table(
        "keel_idempotency_keys",
        sa.Column("service", sa.String(length=32), nullable=False),
        sa.Column("api_key_id", sa.BigInteger(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "service", "api_key_id", "key", name=op.f("pk_keel_idempotency_keys")
        ),
    )
    with op.batch_alter_table("keel_idempotency_keys", schema=None) as batch_op:
        batch_op.create_index("ix_keel_idempotency_keys_created_at", ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("keel_idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_keel_idempotency_keys_created_at")

    op.drop_table("keel_idempotency_keys")
    op.drop_table("keel_api_keys")
