"""Settings: one pydantic-settings base, one subclass per service, environment prefix ``KEEL_``.

Every setting can be given for one service (``KEEL_<SERVICE>_DATABASE_URL``) or for all of them
(``KEEL_DATABASE_URL``); the service-specific variable wins. So one variable points every service
at one PostgreSQL while each can still be split out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DATA_DIR = Path("data")


class ServiceSettings(BaseSettings):
    """What every service needs: where its database is, how it logs, its limits."""

    model_config = SettingsConfigDict(env_prefix="KEEL_", extra="ignore")

    service_name: ClassVar[str] = "keel"
    default_port: ClassVar[int] = 0

    env: Literal["dev", "production"] = "dev"
    database_url: str = ""
    redis_url: str | None = None
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    access_log: bool = True
    # A request this slow is always logged, even on a route that samples its access lines.
    access_log_slow_ms: float = Field(default=500.0, ge=0)
    fast_path: bool = True  # serve measured hot paths with lean routes (keel.core.fastpath)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    rate_limit: str = "2000/second"
    # Redis-backed limits fail open (keel.core.ratelimit): the most a check waits on Redis, and
    # how long the limiter counts in process memory after a failure before asking Redis again.
    rate_limit_redis_timeout_seconds: float = Field(default=0.05, gt=0, le=5)
    rate_limit_redis_backoff_seconds: float = Field(default=1.0, gt=0)
    api_key_cache_seconds: float = Field(default=5.0, ge=0)
    api_key_negative_cache_seconds: float = Field(default=1.0, ge=0)  # unknown keys
    # While the database is unreachable, keys it confirmed this recently still authenticate.
    api_key_stale_seconds: float = Field(default=3600.0, ge=0)
    idempotency_ttl_hours: int = Field(default=24, ge=1)
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL"
    sqlite_busy_timeout_ms: int = Field(default=10_000, ge=0)
    db_pool_size: int = Field(default=10, ge=1)
    # Group commit (keel.core.batching): writes queued past this bound are refused with 503
    # `overloaded`; a submitted write waits at most write_timeout_seconds for its outcome.
    write_queue_max: int = Field(default=4096, ge=1)
    write_timeout_seconds: float = Field(default=15.0, gt=0)
    gc_freeze: bool = True  # see keel.core.app.settle_heap; off only to measure the difference

    @model_validator(mode="before")
    @classmethod
    def _service_database_url(cls, values: Any) -> Any:
        """Default to a SQLite file named after the service under ./data/."""
        if isinstance(values, dict) and not values.get("database_url"):
            values["database_url"] = f"sqlite:///{DATA_DIR / cls.service_name}.db"
        return values

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """``KEEL_<SERVICE>_X`` first, then the shared ``KEEL_X``."""
        shared = EnvSettingsSource(settings_cls, env_prefix="KEEL_")
        return init_settings, env_settings, shared, dotenv_settings, file_secret_settings

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
