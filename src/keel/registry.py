"""The services keel runs, by name. A new service is one entry here plus its package."""

from __future__ import annotations

from dataclasses import dataclass

from keel.core.settings import ServiceSettings
from keel.ledger.settings import LedgerSettings


@dataclass(frozen=True)
class ServiceEntry:
    name: str
    app_factory: str  # import path of a zero-argument app factory, for uvicorn --factory
    settings: type[ServiceSettings]

    @property
    def port(self) -> int:
        return self.settings.default_port


SERVICES: dict[str, ServiceEntry] = {
    "ledger": ServiceEntry("ledger", "keel.ledger.app:create_app", LedgerSettings),
}
