"""indexes for delivery lookups by event and listings by state

Revision ID: ledger_0002
Revises: ledger_0001
Create Date: 2026-11-24 11:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "ledger_0002"
down_revision: str | None = "ledger_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # PostgreSQL does not index foreign keys by itself; GET /webhooks/deliveries?state= pages by id.
    op.create_index(
        "ix_ledger_webhook_deliveries_event_id", "ledger_webhook_deliveries", ["event_id"]
    )
    op.create_index(
        "ix_ledger_webhook_deliveries_state_id", "ledger_webhook_deliveries", ["state", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_ledger_webhook_deliveries_state_id", "ledger_webhook_deliveries")
    op.drop_index("ix_ledger_webhook_deliveries_event_id", "ledger_webhook_deliveries")
