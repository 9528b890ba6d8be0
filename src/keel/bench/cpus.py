"""Giving the server and the load generator CPUs of their own.

On a machine with cores to spare, wrk sharing the server's cores makes its latencies (p99 most of
all) partly a measure of the scheduler. ``--server-cpus`` and ``--wrk-cpus`` pin each to a set of
CPUs. The child inherits the CPU set of the thread that starts it, so :func:`pinned` narrows the
calling thread's set around the start and restores it after: no ``preexec_fn``, no ``taskset``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def parse_cpus(text: str) -> frozenset[int]:
    """``"0-3,6"`` → {0, 1, 2, 3, 6} (taskset's list syntax); every CPU must be usable here."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{text!r} is not a CPU list such as 0-3 or 0,2")
        low, high = int(first), int(last or first)
        if low > high:
            raise ValueError(f"{part!r}: the range runs backwards")
        cpus.update(range(low, high + 1))
    usable = os.sched_getaffinity(0)
    if not cpus <= usable:
        missing = ",".join(map(str, sorted(cpus - usable)))
        raise ValueError(f"CPU(s) {missing} are not available here (usable: {sorted(usable)})")
    return frozenset(cpus)


@contextmanager
def pinned(cpus: frozenset[int] | None) -> Iterator[None]:
    """Processes started inside run on ``cpus`` (and so do their children); None: no change."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
