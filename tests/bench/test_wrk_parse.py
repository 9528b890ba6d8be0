"""The wrk report parser and the Lua scripts it is paired with (no load is generated here)."""

from __future__ import annotations

import pytest

from keel.bench.scenarios import SCENARIOS, Load
from keel.bench.wrk import WrkOutputError, lua_script, parse_output

CLEAN = """\
Running 10s test @ http://127.0.0.1:40111
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    15.02ms    4.10ms  61.83ms   78.12%
    Req/Sec     2.14k   151.33     2.52k    71.00%
  Latency Distribution
     50%   14.52ms
     75%   16.90ms
     90%   19.73ms
     99%   30.05ms
  42593 requests in 10.01s, 13.56MB read
Requests/sec:   4255.14
Transfer/sec:      1.35MB
"""

WITH_ERRORS = """\
Running 5s test @ http://127.0.0.1:5000
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   850.10us  300.00us   1.20s    90.00%
    Req/Sec     3.00k   200.00     3.50k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.01ms
     90%    1.50ms
     99%    1.20s
  30000 requests in 1.00m, 12.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 7
  Non-2xx or 3xx responses: 41
Requests/sec:    499.90
Transfer/sec:    204.80KB
"""


def test_parses_a_clean_report() -> None:
    result = parse_output(CLEAN)
    assert result.requests == 42593
    assert result.duration_s == pytest.approx(10.01)
    assert result.requests_per_s == pytest.approx(4255.14)
    assert result.p50_ms == pytest.approx(14.52)
    assert result.p99_ms == pytest.approx(30.05)
    assert result.errors == 0
    assert result.succeeded == 42593


def test_converts_units_and_counts_errors() -> None:
    result = parse_output(WITH_ERRORS)
    assert result.p50_ms == pytest.approx(0.812)
    assert result.p99_ms == pytest.approx(1200.0)
    assert result.duration_s == pytest.approx(60.0)
    assert result.non_2xx == 41
    assert result.socket_errors == 9
    assert result.errors == 50
    assert result.succeeded == 30000 - 41


def test_refuses_a_report_without_latency_distribution() -> None:
    without = "\n".join(line for line in CLEAN.splitlines() if "%" not in line or "Req" in line)
    with pytest.raises(WrkOutputError, match="latency"):
        parse_output(without)


def test_refuses_garbage() -> None:
    with pytest.raises(WrkOutputError):
        parse_output("unable to connect to 127.0.0.1:1 Connection refused\n")


@pytest.mark.parametrize("load", list(Load))
def test_scripts_carry_the_key_and_the_accounts(load: Load) -> None:
    script = lua_script(load, [7, 8, 9], "kl_secret")
    assert 'wrk.headers["Authorization"] = "Bearer kl_secret"' in script
    assert "local ids = {7,8,9}" in script
    assert ("local hot = 7" in script) is (load is Load.POST_HOT)
    assert ('"/transactions"' in script) is (load is not Load.GET_USER)


def test_every_scenario_has_a_target() -> None:
    assert all(s.target_rps > 0 for s in SCENARIOS.values())
