"""The inventory's own cases for tests/core/test_fast_path.py (fast path on and off agree)."""

from __future__ import annotations

from typing import Any

import httpx

# (method, path, json body or raw bytes, extra headers); "{item}" has stock, "{gone}" none.
CASES: list[tuple[str, str, Any, dict[str, str]]] = [
    ("POST", "/purchase", {"item_id": "{item}", "user_id": "a"}, {}),
    ("POST", "/purchase", {"item_id": "{item}", "user_id": 7, "quantity": 2}, {}),
    ("POST", "/purchase", {"item_id": "{limited}", "user_id": "b", "quantity": 2}, {}),
    ("POST", "/purchase", {"item_id": "{limited}", "user_id": "b"}, {}),
    ("POST", "/purchase", {"item_id": "{gone}", "user_id": "a"}, {}),
    ("POST", "/purchase", {"item_id": 10**12, "user_id": "a"}, {}),
    ("POST", "/purchase", {"item_id": "{item}", "user_id": "a", "quantity": 0}, {}),
    ("POST", "/purchase", {"item_id": "{item}", "user_id": "a", "quantity": -1}, {}),
    ("POST", "/purchase", {"item_id": "{item}", "user_id": "a", "quantity": 10**9}, {}),
    ("POST", "/purchase", {"item_id": "{item}", "user_id": "a", "quantity": 1.5}, {}),
    ("POST", "/purchase", {"item_id": "{item}", "user_id": "", "quantity": 1}, {}),
    ("POST", "/purchase", {"item_id": "{item}", "user_id": "a", "extra": 1}, {}),
    ("POST", "/purchase", {"item_id": "{item}"}, {}),
    ("POST", "/purchase", [1], {}),
    ("POST", "/purchase", b"{not json", {}),
    ("POST", "/purchase", {"item_id": "{item}", "user_id": "k"}, {"Idempotency-Key": "k-1"}),
    ("POST", "/purchase", {"item_id": "{item}", "user_id": "k"}, {"Idempotency-Key": "k-1"}),
    ("POST", "/purchase", {"item_id": "{item}", "user_id": "z"}, {"Idempotency-Key": "k-1"}),
    ("POST", "/purchase", {"item_id": "{item}", "user_id": "a"}, {"Authorization": "Bearer no"}),
    ("POST", "/purchase", {"item_id": "{item}", "user_id": "a"}, {"Authorization": "{read}"}),
]


async def prepare(client: httpx.AsyncClient) -> dict[str, Any]:
    """Items through the API (each run has a fresh database)."""
    ids: dict[str, Any] = {}
    for name, stock, extra in (
        ("item", 100, {}),
        ("gone", 0, {}),
        ("limited", 10, {"max_per_user": 2}),
    ):
        made = await client.post(
            "/items", json={"sku": f"sku-{name}", "name": name, "stock": stock, **extra}
        )
        ids[name] = made.json()["id"]
    return ids
