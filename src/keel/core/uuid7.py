"""UUIDv7 (RFC 9562): time-ordered ids that are never reused, for events and their receivers.

The first 48 bits are the Unix time in milliseconds, so ids sort by creation time and a unique
index on them grows at its right edge, like a sequence's; the remaining 74 bits (after version
and variant) are random, so ids made on any number of hosts never collide in practice. Python
3.11 has no ``uuid.uuid7``; this is the RFC's layout in a few lines, with one ``os.urandom`` call
per batch because that system call is most of the cost of an id.
"""

from __future__ import annotations

import os
import time
from uuid import UUID

_VERSION_AND_VARIANT = (0x7 << 76) | (0b10 << 62)
_RAND_A_AND_B = ~((0xF << 76) | (0b11 << 62)) & ((1 << 80) - 1)


def uuid7_batch(count: int, unix_ms: int | None = None) -> list[UUID]:
    """``count`` fresh UUIDv7s, stamped with ``unix_ms`` (default: the current millisecond)."""
    ms = time.time_ns() // 1_000_000 if unix_ms is None else unix_ms
    prefix = (ms & 0xFFFF_FFFF_FFFF) << 80 | _VERSION_AND_VARIANT
    pool = os.urandom(10 * count)
    return [
        UUID(int=prefix | (int.from_bytes(pool[i : i + 10]) & _RAND_A_AND_B))
        for i in range(0, 10 * count, 10)
    ]


def uuid7() -> UUID:
    """One fresh UUIDv7."""
    return uuid7_batch(1)[0]
