"""The firehose's own cases for tests/core/test_fast_path.py (fast path on and off agree)."""

from __future__ import annotations

import gzip
import json
from typing import Any

import httpx

_EVENT = {"event_id": "0190a4e2-0000-7000-8000-{n}", "user_id": "u", "timestamp": 1_800_000_000}
_NDJSON = {"Content-Type": "application/x-ndjson"}


def _event(n: int, **extra: Any) -> dict[str, Any]:
    return {**_EVENT, "event_id": f"0190a4e2-0000-7000-8000-{n:012d}", **extra}


# (method, path, json body or raw bytes, extra headers)
CASES: list[tuple[str, str, Any, dict[str, str]]] = [
    ("POST", "/events", _event(1), {}),
    ("POST", "/events", _event(1), {}),  # the same id again: accepted, stored once
    ("POST", "/events", {"user_id": "u", "timestamp": "2030-01-01T00:00:00Z"}, {}),
    ("POST", "/events", _event(2, timestamp=1.0), {}),
    ("POST", "/events", _event(3, metadata=[1]), {}),
    ("POST", "/events", _event(4, user_id=["x"]), {}),
    ("POST", "/events", b"{not json", {}),
    ("POST", "/events", b'{"user_id":"\xff","timestamp":1800000000}', {}),
    ("POST", "/events", _event(5), {"Content-Type": "text/plain"}),
    ("POST", "/events", _event(6), {"Content-Encoding": "br"}),
    ("POST", "/events", _event(7), {"Authorization": "Bearer nope"}),
    ("POST", "/events", _event(8), {"Authorization": "{read}"}),
    ("POST", "/events/batch", [_event(9), _event(10, timestamp="x"), 5], {}),
    ("POST", "/events/batch", [], {}),
    ("POST", "/events/batch", [_event(11)] * 1001, {}),
    (
        "POST",
        "/events/batch",
        gzip.compress(b"\n".join(json.dumps(_event(n)).encode() for n in (12, 13))),
        {**_NDJSON, "Content-Encoding": "gzip"},
    ),
    ("POST", "/events/batch", b"[" * 5000 + b"]" * 5000, {}),
]


async def prepare(client: httpx.AsyncClient) -> dict[str, Any]:
    return {}
