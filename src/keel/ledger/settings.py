"""The ledger's settings: ``KEEL_LEDGER_*``, falling back to the shared ``KEEL_*``."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from keel.core.outbox import WebhookSettings


class LedgerSettings(WebhookSettings):
    """The ledger's own settings; the webhook ones (``KEEL_LEDGER_WEBHOOK_*`` …) are the core's."""

    model_config = SettingsConfigDict(env_prefix="KEEL_LEDGER_", extra="ignore")

    service_name: ClassVar[str] = "ledger"
    default_port: ClassVar[int] = 5000

    max_batch: int = Field(default=512, ge=1)
