"""The ledger's bench declaration: its scripts and targets (no load is generated here)."""

from __future__ import annotations

import pytest

from keel.bench.scenarios import REFERENCES
from keel.ledger.bench import BENCH, Load, lua_script
from keel.registry import services


@pytest.mark.parametrize("load", list(Load))
def test_scripts_carry_the_key_and_the_accounts(load: Load) -> None:
    script = lua_script(load, [7, 8, 9], "kl_secret")
    assert 'wrk.headers["Authorization"] = "Bearer kl_secret"' in script
    assert "local ids = {7,8,9}" in script
    assert ("local hot = 7" in script) is (load is Load.POST_HOT)
    assert ('"/transactions"' in script) is (load is not Load.GET_USER)
    assert ("Idempotency-Key" in script) is (load is Load.POST_KEYED)


def test_every_scenario_has_a_target() -> None:
    assert all(s.target_rps > 0 for s in BENCH.scenarios)


def test_the_registered_ledger_benches_its_scenarios_and_the_references() -> None:
    bench = services()["ledger"].load_bench()
    assert bench is BENCH
    names = list(BENCH.all_scenarios())
    assert names[: len(BENCH.scenarios)] == [s.name for s in BENCH.scenarios]
    assert names[len(BENCH.scenarios) :] == [s.name for s in REFERENCES]
