"""GET /search: a case-insensitive, literal substring match on usernames, with bound parameters.

Each test puts a unique token in its usernames and (mostly) its queries, so what it finds is
its own whatever else the database holds.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from keel.core.database import Database
from tests.support.ledger import row_counts


@pytest.fixture
def token() -> str:
    return f"s{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def loose_client(ledger_app: Any, admin_key: str) -> AsyncIterator[httpx.AsyncClient]:
    """Like ``client``, but a server error comes back as a 500 reply instead of raising here."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=ledger_app, raise_app_exceptions=False),
        base_url="http://ledger.test",
        headers={"Authorization": f"Bearer {admin_key}"},
    ) as c:
        yield c


async def _create(client: httpx.AsyncClient, *usernames: str) -> dict[str, int]:
    ids = {}
    for name in usernames:
        response = await client.post("/users", json={"username": name})
        assert response.status_code == 201, response.text
        ids[name] = response.json()["id"]
    return ids


async def _search(client: httpx.AsyncClient, q: str, **params: Any) -> list[str]:
    """Every username matching ``q``, following the cursor to the end."""
    found: list[str] = []
    cursor: str | None = None
    while True:
        query = {"q": q, **params, **({"cursor": cursor} if cursor else {})}
        page = await client.get("/search", params=query)
        assert page.status_code == 200, page.text
        body = page.json()
        found += [user["username"] for user in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return found


@pytest.mark.parametrize(
    ("names", "query", "expected"),
    [
        pytest.param(["50%off", "50xoff", "50off"], "50%o", ["50%off"], id="percent"),
        pytest.param(["a_b", "axb", "ab"], "a_b", ["a_b"], id="underscore"),
        pytest.param(["a\\b", "ab", "a\\\\b", "x\\b"], "a\\b", ["a\\b"], id="backslash"),
        pytest.param(["a\\%b", "a%b", "a\\xb"], "a\\%", ["a\\%b"], id="backslash-percent"),
        pytest.param(["a/b", "ab", "a//b"], "a/b", ["a/b"], id="slash"),
        pytest.param(["x[ab]y", "xay"], "x[ab]", ["x[ab]y"], id="brackets"),
        pytest.param(["star*", "starry"], "star*", ["star*"], id="asterisk"),
        pytest.param(["q?", "qq"], "q?", ["q?"], id="question-mark"),
    ],
)
async def test_wildcards_match_literally(
    client: httpx.AsyncClient, token: str, names: list[str], query: str, expected: list[str]
) -> None:
    await _create(client, *(token + n for n in names))
    assert sorted(await _search(client, token + query)) == sorted(token + e for e in expected)


async def test_lone_wildcards_only_find_names_containing_them(
    client: httpx.AsyncClient, token: str
) -> None:
    await _create(client, f"{token}-100%", f"{token}-under_score", f"{token}-back\\slash")
    for wildcard in ("%", "_", "\\", "%%", "%_%"):
        found = await _search(client, wildcard, limit=100)
        assert all(wildcard in name for name in found), (wildcard, found)
    assert f"{token}-100%" in await _search(client, "%", limit=100)
    assert f"{token}-under_score" in await _search(client, "_", limit=100)
    assert f"{token}-back\\slash" in await _search(client, "\\", limit=100)


async def test_search_ignores_ascii_case(client: httpx.AsyncClient, token: str) -> None:
    await _create(client, f"{token}MiXeD", f"{token}other")
    expected = [f"{token}MiXeD"]
    assert await _search(client, f"{token}mixed") == expected
    assert await _search(client, f"{token}MIXED".upper()) == expected
    assert await _search(client, "ixE" + "d") != []


async def test_search_ignores_case_beyond_ascii(client: httpx.AsyncClient, token: str) -> None:
    await _create(client, f"{token}-\u00c4RGER-\u0394", f"{token}-other")
    assert await _search(client, f"{token}-\u00e4rger-\u03b4") == [f"{token}-\u00c4RGER-\u0394"]


async def test_sql_quote_payload_finds_only_a_user_literally_named_so(
    client: httpx.AsyncClient, token: str
) -> None:
    payload = "' OR '1'='1"
    ids = await _create(client, f"{token}{payload}", f"{token}plain", f"{token}O'Brien")
    found = await _search(client, payload, limit=100)
    assert f"{token}{payload}" in found
    assert all(payload.lower() in name.lower() for name in found)
    assert f"{token}plain" not in found
    assert await _search(client, f"{token}{payload}") == [f"{token}{payload}"]
    assert await _search(client, f"{token}o'b") == [f"{token}O'Brien"]
    assert len(ids) == 3


INJECTIONS = [
    "' OR 1=1 --",
    "%' OR '1'='1' --",
    '" OR ""="',
    "'; DROP TABLE ledger_users; --",
    "' UNION SELECT * FROM ledger_users--",
    "') OR ('a'='a",
    "\\' OR 1=1 --",
    "' ESCAPE '",
    "%' ESCAPE '/",
    "admin'/*",
    "1; SELECT pg_sleep(5)",
    "' || (SELECT username FROM ledger_users) || '",
]


@pytest.mark.parametrize("attack", INJECTIONS)
async def test_injection_attempts_return_no_extra_rows(
    client: httpx.AsyncClient, database: Database, token: str, attack: str
) -> None:
    await _create(client, f"{token}-victim", f"{token}-{attack}")
    before = await row_counts(database)
    found = await _search(client, attack, limit=100)
    assert all(attack.lower() in name.lower() for name in found), found
    assert f"{token}-{attack}" in found
    assert f"{token}-victim" not in found
    # Also glued to the token: exactly the one user named so.
    assert await _search(client, f"{token}-{attack}") == [f"{token}-{attack}"]
    assert await row_counts(database) == before


async def test_cursor_pagination_walks_every_match_once(
    client: httpx.AsyncClient, token: str
) -> None:
    ids = await _create(client, *(f"{token}-page-{i:02}" for i in range(23)))
    await _create(client, f"{token}-nomatch")
    pages = []
    cursor: str | None = None
    while True:
        more = {"cursor": cursor} if cursor else {}
        response = await client.get("/search", params={"q": f"{token}-PAGE", "limit": 5, **more})
        body = response.json()
        pages.append([user["id"] for user in body["items"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [len(page) for page in pages] == [5, 5, 5, 5, 3]
    flat = [user_id for page in pages for user_id in page]
    assert flat == sorted(ids.values())  # in id order, each exactly once


async def test_last_full_page_has_no_next_cursor(client: httpx.AsyncClient, token: str) -> None:
    await _create(client, *(f"{token}-{i}" for i in range(4)))
    page = (await client.get("/search", params={"q": token, "limit": 4})).json()
    assert len(page["items"]) == 4 and page["next_cursor"] is None


async def test_search_result_shape(client: httpx.AsyncClient, token: str) -> None:
    ids = await _create(client, f"{token}-shape")
    page = (await client.get("/search", params={"q": f"{token}-shape"})).json()
    assert page["next_cursor"] is None
    (user,) = page["items"]
    assert user["id"] == ids[f"{token}-shape"]
    assert {"id", "username", "balance", "overdraft_limit", "created_at"} <= set(user)


@pytest.mark.parametrize("q", ["\x00", "a\x00b"], ids=["nul", "nul-inside"])
async def test_nul_in_query_is_refused_or_matches_nothing(
    loose_client: httpx.AsyncClient, token: str, q: str
) -> None:
    await _create(loose_client, f"{token}-ab", f"{token}-a")
    response = await loose_client.get("/search", params={"q": q})
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        assert response.json()["items"] == []
    else:
        assert response.json()["code"] == "validation_error"
