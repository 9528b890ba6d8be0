"""The ledger's benchmark scenarios and the speed targets they are reported against.

The runner measures and reports; it never asserts a target.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Backend(StrEnum):
    SQLITE = "sqlite"
    POSTGRES = "postgres"


class Load(StrEnum):
    """What each request does."""

    POST_SPREAD = "post-spread"  # POST /transactions, a random account of the seeded ones
    POST_HOT = "post-hot"  # POST /transactions, every request on one account
    GET_USER = "get-user"  # GET /users/{id}, a random account


@dataclass(frozen=True)
class Scenario:
    name: str
    backend: Backend
    load: Load
    summary: str
    target_rps: float
    target_p99_ms: float | None = None
    # Chosen for a 2-core box, where wrk needs a slice of a core too. Each worker is one
    # CPU-bound Python process, so two of them. On SQLite the processes take turns at the write
    # lock through a file lock, so one fsyncs its commit while the other serves HTTP.
    default_workers: int = 1
    env: tuple[tuple[str, str], ...] = ()  # extra server settings, e.g. to measure a "before"

    def target_text(self) -> str:
        text = f"≥ {self.target_rps:,.0f}/s"
        if self.target_p99_ms is not None:
            text += f", p99 < {self.target_p99_ms:g} ms"
        return text

    def target_met(self, rps: float, p99_ms: float) -> bool:
        if rps < self.target_rps:
            return False
        return self.target_p99_ms is None or p99_ms < self.target_p99_ms


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "sqlite-post-spread",
            Backend.SQLITE,
            Load.POST_SPREAD,
            "SQLite, POST /transactions over 1,000 accounts, each committed before its 201",
            target_rps=4000,
            target_p99_ms=50,
            default_workers=2,
        ),
        Scenario(
            "sqlite-post-spread-fastapi",
            Backend.SQLITE,
            Load.POST_SPREAD,
            "the same, with the lean fast-path routes off (KEEL_FAST_PATH=false): the 'before'",
            target_rps=4000,
            target_p99_ms=50,
            default_workers=2,
            env=(("KEEL_FAST_PATH", "false"),),
        ),
        Scenario(
            "sqlite-get-user",
            Backend.SQLITE,
            Load.GET_USER,
            "SQLite, GET /users/{id} over 1,000 accounts",
            target_rps=6000,
            default_workers=2,
        ),
        Scenario(
            "postgres-post-spread",
            Backend.POSTGRES,
            Load.POST_SPREAD,
            "PostgreSQL, POST /transactions over 1,000 accounts",
            target_rps=3000,
            default_workers=2,
        ),
        Scenario(
            "postgres-post-hot",
            Backend.POSTGRES,
            Load.POST_HOT,
            "PostgreSQL, POST /transactions, every connection on one account",
            target_rps=2000,
            default_workers=2,
        ),
    ]
}
