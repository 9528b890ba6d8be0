"""The lean hot-path routes answer exactly as the documented FastAPI routes do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from keel.ledger.app import create_app
from keel.ledger.settings import LedgerSettings
from tests.ledger.helpers import unique

# (method, path template, json body or raw bytes, extra headers); {a} and {b} are funded users.
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


def _fill(value: Any, ids: dict[str, int]) -> Any:
    if isinstance(value, str):
        return ids[value[1]] if value in ("{a}", "{b}") else value.format(**ids)
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


@pytest.fixture
async def slow_client(
    ledger_settings: LedgerSettings, admin_key: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The same ledger with the fast path switched off: FastAPI serves every route."""
    app = create_app(ledger_settings.model_copy(update={"fast_path": False}))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://ledger.test",
            headers={"Authorization": f"Bearer {admin_key}"},
        ) as c,
    ):
        yield c


async def _answers(client: httpx.AsyncClient) -> list[tuple[int, str | None, list[Any] | None]]:
    ids = {}
    for name in ("a", "b"):
        user = (await client.post("/users", json={"username": unique()})).json()
        await client.post("/transactions", json={"user_id": user["id"], "amount": 100})
        ids[name] = user["id"]
    answers = []
    for method, path, body, headers in CASES:
        kwargs: dict[str, Any] = {"headers": headers}
        if isinstance(body, bytes):
            kwargs["content"] = body
            kwargs["headers"] = {**headers, "Content-Type": "application/json"}
        elif body is not None:
            kwargs["json"] = _fill(body, ids)
        response = await client.request(method, _fill(path, ids), **kwargs)
        payload = response.json()
        locs = [e["loc"] for e in payload.get("errors", [])] if isinstance(payload, dict) else None
        answers.append(
            (response.status_code, payload.get("code") if isinstance(payload, dict) else None, locs)
        )
    return answers


async def test_fast_and_framework_routes_agree(
    client: httpx.AsyncClient, slow_client: httpx.AsyncClient
) -> None:
    fast, slow = await _answers(client), await _answers(slow_client)
    for case, fast_answer, slow_answer in zip(CASES, fast, slow, strict=True):
        assert fast_answer[:2] == slow_answer[:2], case
        if fast_answer[1] == "validation_error":
            assert fast_answer[2][0][:2] == slow_answer[2][0][:2], case
    assert [a[0] for a in fast].count(201) == 3


async def test_hot_routes_stay_documented(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "post" in paths["/transactions"] and "post" in paths["/transfers"]
    assert "get" in paths["/users/{user_id}"]
