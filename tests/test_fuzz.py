"""Schemathesis against every service's own OpenAPI, over real HTTP, with every check.

The checks are those of ``schemathesis run --checks all`` (the default set of the Python API,
configured by the repository's ``schemathesis.toml``): no 5xx, every status, content type, header
and body documented, schema-valid requests accepted, invalid ones refused, auth not ignored. Each
operation is fuzzed with valid and invalid requests, then the stateful phase chains operations
through the links schemathesis infers (a created user's id into the next request).

Each service runs as a real ``keel serve`` on a fresh SQLite file and on a fresh PostgreSQL
database, authenticated with an admin key so requests reach the handlers.

The operations are driven through ``APIOperation.as_strategy()``: schemathesis's ``from_fixture``
pytest loader (the way to fuzz a server a fixture starts) breaks on pytest 9, which no longer has
the ``Node._nodeid`` attribute it rewrites.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import FlakyStrategyDefinition
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from keel.core.errors import PROBLEM_JSON, InvalidRequest, documented_codes
from keel.core.migrate import upgrade
from keel.registry import load, services
from tests import backends
from tests.support.ledger import create_key
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.slow

CONFIG = SchemathesisConfig.from_path(Path(__file__).parents[1] / "schemathesis.toml")
EXAMPLES = int(os.environ.get("KEEL_TEST_FUZZ_EXAMPLES", "40"))
STATEFUL_EXAMPLES = int(os.environ.get("KEEL_TEST_FUZZ_STATEFUL_EXAMPLES", "30"))
STATEFUL_SECONDS = 30
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


SERVICES = services()


def service_app(name: str) -> FastAPI:
    """The app a service's registration builds; building it opens nothing (the lifespan does)."""
    entry = SERVICES[name]
    settings_ = entry.settings_class()(env="dev", database_url="sqlite:///unused.db")
    app: FastAPI = load(entry.app_factory)(settings_)
    return app


SCHEMAS = {
    name: schemathesis.openapi.from_dict(service_app(name).openapi(), config=CONFIG)
    for name in SERVICES
}
OPERATIONS = [
    (name, result.ok())
    for name, schema in SCHEMAS.items()
    for result in schema.get_all_operations()
]


@dataclass
class Running:
    """A service serving on a migrated database, and an admin key valid on it."""

    name: str
    server: LiveServer
    headers: dict[str, str]


class Targets:
    """One server per service on this backend, started when first fuzzed, stopped at the end."""

    def __init__(self, backend: str, workdir: Path) -> None:
        self.backend = backend
        self.workdir = workdir
        self.running: dict[str, Running] = {}
        self.databases: list[str] = []

    def get(self, name: str) -> Running:
        if name not in self.running:
            self.running[name] = self._start(name)
        return self.running[name]

    def _start(self, name: str) -> Running:
        if self.backend == "postgres":
            url = asyncio.run(backends.create_postgres_database())
            self.databases.append(url)
        else:
            url = f"sqlite:///{self.workdir / f'{name}.db'}"
        asyncio.run(upgrade(url, [SERVICES[name].migrations]))
        key = asyncio.run(create_key(url))
        server = LiveServer(url, self.workdir / name, service=name)
        server.workdir.mkdir()
        # Registered before it starts, so close() stops it even if the start fails half way.
        self.running[name] = Running(name, server, {"Authorization": f"Bearer {key}"})
        server.start()
        return self.running[name]

    def close(self) -> None:
        for running in self.running.values():
            running.server.stop()
        for url in self.databases:
            asyncio.run(backends.drop_postgres_database(url))


@pytest.fixture(scope="session")
def targets(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Targets]:
    found = Targets(backend, tmp_path_factory.mktemp(f"fuzz-{backend}"))
    try:
        yield found
    finally:
        found.close()


def rule_refusals_are_documented(ctx: Any, response: Any, case: Any) -> bool | None:
    """A valid request refused with 422 names a rule the operation documents.

    ``schemathesis.toml`` lets these operations answer valid data with 422, because some rules
    (two fields that differ, a balance, a reused Idempotency-Key) are beyond JSON Schema. This
    keeps that allowance honest: the 422 must carry one of the operation's documented rule codes,
    not ``validation_error`` — except for an integer written as a float (``10.0``), which JSON
    Schema counts as an integer and keel refuses on purpose.
    """
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return None
    code = json.loads(response.content).get("code")
    entry = case.operation.definition.raw.get("responses", {}).get("422", {})
    rules = set(documented_codes(entry)) - {InvalidRequest.code}
    if code in rules or (code == InvalidRequest.code and _has_float(case.body)):
        return None
    raise AssertionError(f"valid data refused with 422 {code!r}; documented rules: {rules}")


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_float(item) for item in value)
    return False


CHECKS = [rule_refusals_are_documented]


@pytest.mark.parametrize(
    ("service", "operation"), OPERATIONS, ids=[f"{n}:{op.label}" for n, op in OPERATIONS]
)
def test_every_generated_request_gets_a_documented_answer(
    targets: Targets, service: str, operation: Any
) -> None:
    running = targets.get(service)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        mode = data.draw(st.sampled_from(MODES))
        case = data.draw(operation.as_strategy(generation_mode=mode))
        case.call_and_validate(
            base_url=running.server.base_url,
            headers=running.headers,
            additional_checks=CHECKS,
            timeout=30,
        )

    fuzz()


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_stateful_sequences_get_documented_answers(targets: Targets, service: str) -> None:
    """Operations chained through their links: what one creates, the next reads or spends."""
    running = targets.get(service)
    base = SCHEMAS[running.name].as_state_machine()

    scenarios = 0

    class Machine(base):  # type: ignore[valid-type,misc]
        def setup(self) -> None:
            nonlocal scenarios
            scenarios += 1

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": running.server.base_url, "headers": running.headers}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            super().validate_response(response, case, additional_checks=CHECKS, **kwargs)

    # Generate only, as `schemathesis run` does: a scenario's rules depend on what the server
    # answered before, so replaying one to shrink it cannot reproduce its draws.
    run_settings = settings(
        max_examples=STATEFUL_EXAMPLES,
        stateful_step_count=6,
        phases=[Phase.generate],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    # Hypothesis also notices that draws differ from its record of earlier scenarios, and calls
    # the strategy flaky; like `schemathesis run`, start a fresh run instead of failing.
    deadline = time.monotonic() + STATEFUL_SECONDS
    while True:
        try:
            Machine.run(settings=run_settings)
            break
        except FlakyStrategyDefinition:
            if time.monotonic() > deadline:
                break
    assert scenarios >= STATEFUL_EXAMPLES / 2, f"only {scenarios} scenarios ran"


def test_ledger_still_balances_after_fuzzing(targets: Targets) -> None:
    running = targets.get("ledger")
    audit = httpx.get(f"{running.server.base_url}/audit", headers=running.headers, timeout=30)
    assert audit.json()["ok"] is True, audit.json()


def test_problem_responses_are_documented_as_problem_json() -> None:
    """Every 4xx/5xx of every operation is problem+json with its codes (what clients generate)."""
    for name in SERVICES:
        document = service_app(name).openapi()
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                for status, entry in operation["responses"].items():
                    if int(status) >= 400:
                        assert list(entry["content"]) == [PROBLEM_JSON], (name, method, path)
                        assert documented_codes(entry), (name, method, path, status)


def test_no_parameter_admits_a_null() -> None:
    """An optional parameter may be absent; a query string cannot carry null. A schema that
    admits one lets a fuzzer's 'invalid' value serialise to nothing and be rightly accepted."""
    for name in SERVICES:
        document = service_app(name).openapi()
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                for parameter in operation.get("parameters", []):
                    schema = parameter["schema"]
                    assert {"type": "null"} not in schema.get("anyOf", []), (name, method, path)


def test_no_integer_bound_is_lost_in_a_float() -> None:
    """2**63 - 1 written as a bound reads back as 2**63 to any client that parses JSON numbers
    as floats (schemathesis did): a fuzzer then sent ids: [2**63] as schema-valid, and got 422.
    Bounds past 2**53 are written exactly: ``exclusiveMaximum: 2**63`` (see core.schemas)."""

    def bounds(node: Any, where: str) -> Iterator[tuple[str, str, int]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum"):
                    yield where, key, value
                else:
                    yield from bounds(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, item in enumerate(node):
                yield from bounds(item, f"{where}/{index}")

    for name in SERVICES:
        for where, key, value in bounds(service_app(name).openapi(), name):
            assert abs(value) <= 2**53 or float(value) == value, (where, key, value)
