"""Schemathesis against the ledger's own OpenAPI document: no generated request is a 5xx.

The requests go over real HTTP to the shared 4-worker server, authenticated with an admin key
so they reach the real handlers (not just the 401 in front of them), on SQLite and PostgreSQL.
Afterwards the audit must still find every balance equal to its entries.

Each operation is its own test, driven through ``APIOperation.as_strategy()``: schemathesis's
``from_fixture`` pytest loader (the way to fuzz a server a fixture starts) breaks on pytest 9,
which no longer has the ``Node._nodeid`` attribute it rewrites.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from keel.ledger.app import create_app
from keel.ledger.settings import LedgerSettings
from tests.ledger.conftest import Cluster

pytestmark = pytest.mark.slow

# The document the server will serve; building the app opens nothing (that is the lifespan's).
SCHEMA = schemathesis.openapi.from_dict(
    create_app(LedgerSettings(env="dev", database_url="sqlite:///unused.db")).openapi()
)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
EXAMPLES = int(os.environ.get("KEEL_TEST_FUZZ_EXAMPLES", "60"))
# Valid requests reach the handlers; invalid ones probe the validation in front of them.
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.label for op in OPERATIONS])
def test_no_generated_request_is_a_server_error(ledger_cluster: Cluster, operation: Any) -> None:
    headers = {"Authorization": f"Bearer {ledger_cluster.admin_key}"}

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
            base_url=ledger_cluster.server.base_url,
            headers=headers,
            checks=[not_a_server_error],
            timeout=30,
        )

    fuzz()


def test_ledger_still_balances_after_fuzzing(ledger_cluster: Cluster) -> None:
    audit = httpx.get(
        f"{ledger_cluster.server.base_url}/audit",
        headers={"Authorization": f"Bearer {ledger_cluster.admin_key}"},
        timeout=30,
    ).json()
    assert audit["ok"] is True, audit
