"""What ``GET /webhooks/deliveries`` returns."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, Field


class Delivery(BaseModel):
    """One event's delivery to one URL: where it stands and what the last attempt got."""

    id: int
    event_id: UUID = Field(description="The event's id, as in the body's `id` and Keel-Event-Id.")
    url: str
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime
