"""The ledger's own cases for tests/core/test_fast_path.py (fast path on and off agree)."""

from __future__ import annotations

from typing import Any

import httpx

# (method, path, json body or raw bytes, extra headers); "{a}" and "{b}" are funded users.
CASES: list[tuple[str, str, Any, dict[str, str]]] = [
    ("POST", "/transactions", {"user_id": "{a}", "amount": 5, "description": "ok"}, {}),
    ("POST", "/transaction", {"user_id": "{a}", "amount": -1}, {}),
    ("POST", "/transactions", {"user_id": "{a}", "amount": -(10**9)}, {}),
    ("POST", "/transactions", {"user_id": "{a}", "amount": 0}, {}),
    ("POST", "/transactions", {"user_id": "{a}", "amount": 1.5}, {}),
    ("POST", "/transactions", {"user_id": "{a}", "amount": 1.0}, {}),
    ("POST", "/transactions", {"user_id": "{a}", "amount": "5"}, {}),
    ("POST", "/transactions", {"user_id": "{a}", "amount": True}, {}),
    ("POST", "/transactions", {"user_id": "{a}", "amount": 10**13}, {}),
    ("POST", "/transactions", {"user_id": "{a}", "amount": 1, "extra": 1}, {}),
    ("POST", "/transactions", {"user_id": 2**62, "amount": 1}, {}),
    ("POST", "/transactions", {"user_id": 0, "amount": 1}, {}),
    ("POST", "/transactions", {"amount": 1}, {}),
    ("POST", "/transactions", {"user_id": "{a}", "amount": 1, "description": "a\x00b"}, {}),
    ("POST", "/transactions", [1, 2], {}),
    ("POST", "/transactions", b"{not json", {}),
    ("POST", "/transactions", {"user_id": "{a}", "amount": 1}, {"Authorization": "Bearer nope"}),
    ("POST", "/transactions", {"user_id": "{a}", "amount": 1}, {"Idempotency-Key": "x" * 256}),
    ("POST", "/transfers", {"from_user_id": "{a}", "to_user_id": "{b}", "amount": 3}, {}),
    ("POST", "/transfers", {"from_user_id": "{a}", "to_user_id": "{a}", "amount": 3}, {}),
    ("POST", "/transfers", {"from_user_id": "{a}", "to_user_id": "{b}", "amount": -3}, {}),
    ("POST", "/transfers", {"from_user_id": "{a}", "to_user_id": "{b}", "amount": 10**9}, {}),
    ("GET", "/users/{a}", None, {}),
    ("GET", "/users/0", None, {}),
    ("GET", "/users/abc", None, {}),
    ("GET", f"/users/{2**70}", None, {}),
    ("GET", "/users/4611686018427387904", None, {}),
    ("GET", "/users/{a}", None, {"Authorization": ""}),
]


async def prepare(client: httpx.AsyncClient) -> dict[str, Any]:
    """Two funded users, "{a}" and "{b}", through the API (each run has a fresh database)."""
    ids: dict[str, Any] = {}
    for name in ("a", "b"):
        user = (await client.post("/users", json={"username": f"user-{name}"})).json()
        await client.post("/transactions", json={"user_id": user["id"], "amount": 100})
        ids[name] = user["id"]
    return ids
