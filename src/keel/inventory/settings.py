"""The inventory's settings: ``KEEL_INVENTORY_*``, falling back to the shared ``KEEL_*``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from keel.core.outbox import WebhookSettings


class InventorySettings(WebhookSettings):
    """The inventory's own settings; the webhook ones (``KEEL_INVENTORY_WEBHOOK_*``) are core."""

    model_config = SettingsConfigDict(env_prefix="KEEL_INVENTORY_", extra="ignore")

    service_name: ClassVar[str] = "inventory"
    default_port: ClassVar[int] = 8001

    max_batch: int = Field(default=512, ge=1)  # purchases one transaction carries at most
    max_hold_seconds: int = Field(default=900, ge=1, le=86_400)
    # How often expired holds are returned to stock: well inside the promised second.
    sweep_every_seconds: float = Field(default=0.25, gt=0, le=1)
