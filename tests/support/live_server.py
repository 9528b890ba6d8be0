"""The test suite's live server: :class:`keel.serving.ServiceProcess` with a test's defaults.

No access log, no rate limit, and none of the developer's ``KEEL_*`` settings: a test's server
runs where the test says. Everything else (its own process group, ``kill -9`` of every worker at
once, readiness of every worker, requests counted per pid) is the launcher ``keel prove`` uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from keel.serving import ServerError, ServiceProcess, free_port, group_members, wait_until

__all__ = ["LiveServer", "ServerError", "free_port", "group_members", "wait_until"]

TEST_SETTINGS = {"KEEL_RATE_LIMIT": "1000000/second", "KEEL_ACCESS_LOG": "false"}


class LiveServer(ServiceProcess):
    def __init__(
        self,
        database_url: str,
        workdir: Path,
        workers: int = 1,
        service: str = "ledger",
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            service=service,
            database_url=database_url,
            workdir=workdir,
            workers=workers,
            env={**TEST_SETTINGS, **(env or {})},
            inherit_settings=False,
        )
