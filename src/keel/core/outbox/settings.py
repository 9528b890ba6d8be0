"""Webhook settings, for the settings class of a service that publishes events.

They are read with the service's prefix (``KEEL_<SERVICE>_WEBHOOK_URLS``, …). Whenever webhook
URLs are set, in any environment, a real secret must be set too: a default or empty secret would
let anyone who has read the source forge the service's webhooks.
"""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import Field, model_validator
from pydantic_settings import NoDecode

from keel.core.settings import ServiceSettings

MIN_SECRET_LENGTH = 16
# The signing secret earlier versions defaulted to in dev mode: public, so never accepted.
_PUBLISHED_SECRETS = frozenset({"keel-dev-webhook-secret"})


class WebhookSettings(ServiceSettings):
    """The outbox worker's settings: where events go, how they are signed, retried and kept."""

    webhook_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated URLs that receive the service's events."
    )
    webhook_secret: str = Field(default="", description="HMAC key; required with webhook_urls.")
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

    @model_validator(mode="before")
    @classmethod
    def _split_urls(cls, values: object) -> object:
        if isinstance(values, dict) and isinstance(values.get("webhook_urls"), str):
            values["webhook_urls"] = [
                u.strip() for u in values["webhook_urls"].split(",") if u.strip()
            ]
        return values

    @model_validator(mode="after")
    def _lease_outlasts_request(self) -> Self:
        # A lease that ends while its request may still run lets a second worker send it too.
        if self.webhook_lease_seconds <= self.webhook_timeout_seconds:
            raise ValueError("webhook_lease_seconds must exceed webhook_timeout_seconds")
        return self

    @model_validator(mode="after")
    def _secret_with_urls(self) -> Self:
        if not self.webhook_urls:
            return self
        secret = self.webhook_secret.strip()
        if len(secret) < MIN_SECRET_LENGTH or secret in _PUBLISHED_SECRETS:
            variable = f"{self.model_config.get('env_prefix', 'KEEL_')}WEBHOOK_SECRET"
            raise ValueError(
                f"webhook URLs are set, so {variable} must be set to a secret of at least "
                f"{MIN_SECRET_LENGTH} characters (not a published default): receivers could not "
                "tell keel's webhooks from forged ones"
            )
        return self
