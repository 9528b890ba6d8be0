"""The toy service's bench: one scenario of note posts."""

from __future__ import annotations

from pathlib import Path

from keel.bench.scenarios import Backend, Scenario, ServiceBench

SCRIPT = """\
wrk.method = "POST"
wrk.path = "/notes"
wrk.body = '{{"text": "bench"}}'
wrk.headers["Authorization"] = "Bearer {key}"
wrk.headers["Content-Type"] = "application/json"
"""


class ToyWorkload:
    def seed(self, base_url: str, api_key: str, count: int) -> list[int]:
        return []

    def lua_script(self, scenario: Scenario, ids: list[int], api_key: str) -> str:
        return SCRIPT.format(key=api_key)

    def count_writes(self, database_url: str) -> int | None:
        from keel.bench.stage import count_rows

        return count_rows(database_url, "SELECT count(*) FROM toy_notes")

    def audit(self, database_url: str, log: Path) -> bool | None:
        return None


BENCH = ServiceBench(
    service="toy",
    scenarios=(
        Scenario("sqlite-notes", Backend.SQLITE, "notes", "SQLite, POST /notes", target_rps=100),
    ),
    workload=ToyWorkload(),
    load_text="POSTs add one note each.",
)
