"""Small helpers the ledger tests share."""

from __future__ import annotations

import uuid
from typing import Any

import httpx


def unique(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def new_user(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {"username": unique(), **fields}
    response = await client.post("/users", json=body)
    assert response.status_code == 201, response.text
    user: dict[str, Any] = response.json()
    return user


async def deposit(client: httpx.AsyncClient, user_id: int, amount: int) -> dict[str, Any]:
    response = await client.post(
        "/transactions", json={"user_id": user_id, "amount": amount, "description": "deposit"}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body
