"""The ledger's settings: ``KEEL_LEDGER_*``, falling back to the shared ``KEEL_*``."""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from keel.core.settings import ServiceSettings

DEV_WEBHOOK_SECRET = "keel-dev-webhook-secret"  # noqa: S105 - refused outside dev mode


class LedgerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="KEEL_LEDGER_", extra="ignore")

    service_name: ClassVar[str] = "ledger"
    default_port: ClassVar[int] = 5000

    webhook_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated URLs that receive transaction.posted."
    )
    webhook_secret: str = DEV_WEBHOOK_SECRET
    webhook_timeout_seconds: float = Field(default=5.0, gt=0)
    webhook_max_attempts: int = Field(default=12, ge=1)
    webhook_backoff_base_seconds: float = Field(default=1.0, gt=0)
    webhook_backoff_max_seconds: float = Field(default=3600.0, gt=0)
    outbox_poll_seconds: float = Field(default=0.5, gt=0)
    outbox_worker: bool = Field(
        default=True,
        description="Run the webhook worker in this process; off for benches or a separate fleet.",
    )
    outbox_batch_size: int = Field(default=500, ge=1, le=10_000)
    webhook_batch_size: int = Field(
        default=32, ge=1, le=1000, description="Webhook requests in flight at once per worker."
    )
    webhook_lease_seconds: float = Field(
        default=60.0, gt=0, description="How long a claimed delivery is hidden from other workers."
    )
    outbox_retention_hours: float = Field(
        default=168.0, gt=0, description="Delivered webhooks and their events are kept this long."
    )
    max_batch: int = Field(default=512, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _split_urls(cls, values: object) -> object:
        if isinstance(values, dict) and isinstance(values.get("webhook_urls"), str):
            values["webhook_urls"] = [
                u.strip() for u in values["webhook_urls"].split(",") if u.strip()
            ]
        return values

    @model_validator(mode="after")
    def _lease_outlasts_request(self) -> LedgerSettings:
        # A lease that ends while its request may still run lets a second worker send it too.
        if self.webhook_lease_seconds <= self.webhook_timeout_seconds:
            raise ValueError("webhook_lease_seconds must exceed webhook_timeout_seconds")
        return self

    @model_validator(mode="after")
    def _no_dev_secret_in_production(self) -> LedgerSettings:
        if self.env == "production" and self.webhook_secret == DEV_WEBHOOK_SECRET:
            raise ValueError(
                "set KEEL_LEDGER_WEBHOOK_SECRET: the dev secret is refused in production"
            )
        return self
