"""--server-cpus and --wrk-cpus: parsing, and children really confined to the chosen CPUs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from keel.bench.cpus import parse_cpus, pinned

FIRST = min(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("text", "expected"),
    [(f"{FIRST}", {FIRST}), (f"{FIRST}-{FIRST}", {FIRST}), (f" {FIRST} ,{FIRST}", {FIRST})],
)
def test_cpu_lists_parse(text: str, expected: set[int]) -> None:
    assert parse_cpus(text) == expected


def test_every_usable_cpu_parses_as_a_range() -> None:
    usable = os.sched_getaffinity(0)
    if usable == set(range(min(usable), max(usable) + 1)):
        assert parse_cpus(f"{min(usable)}-{max(usable)}") == usable


@pytest.mark.parametrize("text", ["", "a", "1-0", "0-", "-1", "0;1", "4096"])
def test_bad_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpus(text)


def _child_cpus() -> set[int]:
    code = "import os; print(','.join(map(str, sorted(os.sched_getaffinity(0)))))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {int(cpu) for cpu in done.stdout.strip().split(",")}


def test_a_child_started_inside_runs_only_there_and_the_caller_is_restored() -> None:
    before = os.sched_getaffinity(0)
    with pinned(frozenset({FIRST})):
        assert _child_cpus() == {FIRST}
    assert os.sched_getaffinity(0) == before
    assert _child_cpus() == before
    with pinned(None):
        assert _child_cpus() == before
