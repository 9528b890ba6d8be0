"""Bad input: each request below gets a 4xx problem document with a stable code, writes nothing.

"Writes nothing" is checked by counting the rows of every table the ledger writes (users,
entries, transfers, outbox, idempotency keys) before and after each request.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import update

from keel.core.auth import Scope
from keel.core.database import Database
from keel.core.schemas import encode_cursor
from keel.core.tables import api_keys
from keel.ledger.schemas import MAX_AMOUNT
from tests.ledger.conftest import Cluster
from tests.ledger.helpers import deposit, new_user, unique
from tests.support.ledger import accounts, row_counts

MIB = 1024 * 1024
MAX_ID = 2**63 - 1
UNKNOWN_ID = 2**62  # a valid id no test ever reaches
INVALID_JSON = (400, "invalid_json")
VALIDATION = (422, "validation_error")


@dataclass(frozen=True)
class Bad:
    """One bad request: ``body`` gets a real user id (and a second one, for transfers)."""

    name: str
    body: Callable[[int, int], Any] | str | bytes
    status: int
    code: str
    path: str = "/transactions"
    marks: tuple[Any, ...] = field(default=())
    or_else: tuple[int, str] | None = None  # another answer as right (see its use)

    def param(self) -> Any:
        return pytest.param(self, id=self.name, marks=self.marks)


def _txn(amount: Any) -> Callable[[int, int], Any]:
    return lambda uid, _other: {"user_id": uid, "amount": amount}


def _txn_to(user_id: Any) -> Callable[[int, int], Any]:
    return lambda _uid, _other: {"user_id": user_id, "amount": 1}


BAD_POSTINGS = [
    Bad("string-amount", _txn("10"), 422, "validation_error"),
    Bad("string-user-id", lambda u, _: {"user_id": str(u), "amount": 10}, 422, "validation_error"),
    Bad("bool-amount", _txn(True), 422, "validation_error"),
    Bad("bool-user-id", _txn_to(True), 422, "validation_error"),
    Bad("null-amount", _txn(None), 422, "validation_error"),
    Bad("object-amount", _txn({"value": 10}), 422, "validation_error"),
    Bad("array-body", lambda u, _: [u, 10], 422, "validation_error"),
    Bad("null-body", "null", 422, "validation_error"),
    Bad("string-body", '"deposit 10"', 422, "validation_error"),
    Bad("empty-object", lambda u, _: {}, 422, "validation_error"),
    Bad("missing-amount", lambda u, _: {"user_id": u}, 422, "validation_error"),
    Bad("missing-user-id", lambda u, _: {"amount": 10}, 422, "validation_error"),
    Bad(
        "extra-field",
        lambda u, _: {"user_id": u, "amount": 10, "currency": "EUR"},
        422,
        "validation_error",
    ),
    Bad(
        "extra-balance-after",
        lambda u, _: {"user_id": u, "amount": 10, "balance_after": 10**9},
        422,
        "validation_error",
    ),
    Bad("zero-amount", _txn(0), 422, "validation_error"),
    Bad("float-amount-1.5", _txn(1.5), 422, "validation_error"),
    Bad("float-amount-1.0", _txn(1.0), 422, "validation_error"),
    Bad(
        "float-amount-1e2",
        lambda u, _: f'{{"user_id": {u}, "amount": 1e2}}',
        422,
        "validation_error",
    ),
    # NaN and Infinity are not JSON, though Python's json module reads them.
    Bad(
        "nan-amount",
        lambda u, _: f'{{"user_id": {u}, "amount": NaN}}',
        *INVALID_JSON,
        or_else=VALIDATION,
    ),
    Bad(
        "infinite-amount",
        lambda u, _: f'{{"user_id": {u}, "amount": -Infinity}}',
        *INVALID_JSON,
        or_else=VALIDATION,
    ),
    Bad("amount-1e12-plus-1", _txn(MAX_AMOUNT + 1), 422, "validation_error"),
    Bad("amount-minus-1e12-minus-1", _txn(-MAX_AMOUNT - 1), 422, "validation_error"),
    Bad("amount-10e13", _txn(10**13), 422, "validation_error"),
    Bad("amount-10e30", _txn(10**30), 422, "validation_error"),
    Bad("amount-minus-10e30", _txn(-(10**30)), 422, "validation_error"),
    Bad("user-id-0", _txn_to(0), 422, "validation_error"),
    Bad("user-id-minus-1", _txn_to(-1), 422, "validation_error"),
    Bad("user-id-2e63", _txn_to(MAX_ID + 1), 422, "validation_error"),
    Bad("user-id-2e70", _txn_to(2**70), 422, "validation_error"),
    Bad("user-id-float", _txn_to(1.0), 422, "validation_error"),
    Bad("unknown-user", _txn_to(UNKNOWN_ID), 404, "user_not_found"),
    Bad("unknown-user-max-id", _txn_to(MAX_ID), 404, "user_not_found"),
    Bad("overdraft", lambda _, o: {"user_id": o, "amount": -1}, 422, "insufficient_funds"),
    Bad(
        "description-too-long",
        lambda u, _: {"user_id": u, "amount": 1, "description": "x" * 501},
        422,
        "validation_error",
    ),
    Bad(
        "description-nul",
        lambda u, _: {"user_id": u, "amount": 1, "description": "a\x00b"},
        422,
        "validation_error",
    ),
    # Valid JSON syntax, but no character: refused as either.
    Bad(
        "description-lone-surrogate",
        lambda u, _: f'{{"user_id": {u}, "amount": 1, "description": "\\ud800"}}',
        *VALIDATION,
        or_else=INVALID_JSON,
    ),
    Bad("malformed-json", lambda u, _: f'{{"user_id": {u}, "amount": 1', *INVALID_JSON),
    Bad("not-json", "user=1&amount=10", *INVALID_JSON),
    Bad("trailing-garbage", lambda u, _: f'{{"user_id": {u}, "amount": 1}} x', *INVALID_JSON),
    Bad(
        "invalid-utf8",
        lambda u, _: b'{"user_id": %d, "amount": 1, "description": "\xff"}' % u,
        *INVALID_JSON,
    ),
    # Valid JSON that no parser should choke on: a type error (422) or a parse refusal (400).
    Bad("deep-nesting", "[" * 50_000 + "]" * 50_000, *VALIDATION, or_else=INVALID_JSON),
    Bad(
        "integer-of-5000-digits",
        lambda u, _: f'{{"user_id": {u}, "amount": {"9" * 5000}}}',
        *VALIDATION,
        or_else=INVALID_JSON,
    ),
    # The same three on a route FastAPI serves.
    Bad(
        "user-invalid-utf8",
        b'{"username": "\xff\xfe"}',
        *INVALID_JSON,
        "/users",
    ),
    Bad(
        "user-deep-nesting",
        '{"username": ' + "[" * 50_000 + "]" * 50_000 + "}",
        *VALIDATION,
        "/users",
        or_else=INVALID_JSON,
    ),
    Bad(
        "user-integer-of-5000-digits",
        lambda u, _: f'{{"username": "{unique()}", "overdraft_limit": {"9" * 5000}}}',
        *VALIDATION,
        "/users",
        or_else=INVALID_JSON,
    ),
    # Transfers.
    Bad(
        "transfer-same-account",
        lambda u, _: {"from_user_id": u, "to_user_id": u, "amount": 1},
        422,
        "same_account_transfer",
        "/transfers",
    ),
    Bad(
        "transfer-negative",
        lambda u, o: {"from_user_id": u, "to_user_id": o, "amount": -5},
        422,
        "validation_error",
        "/transfers",
    ),
    Bad(
        "transfer-zero",
        lambda u, o: {"from_user_id": u, "to_user_id": o, "amount": 0},
        422,
        "validation_error",
        "/transfers",
    ),
    Bad(
        "transfer-float",
        lambda u, o: {"from_user_id": u, "to_user_id": o, "amount": 2.5},
        422,
        "validation_error",
        "/transfers",
    ),
    Bad(
        "transfer-too-much",
        lambda u, o: {"from_user_id": u, "to_user_id": o, "amount": 1_001},
        422,
        "insufficient_funds",
        "/transfers",
    ),
    Bad(
        "transfer-to-unknown",
        lambda u, _: {"from_user_id": u, "to_user_id": UNKNOWN_ID, "amount": 1},
        404,
        "user_not_found",
        "/transfers",
    ),
    Bad(
        "transfer-from-unknown",
        lambda u, _: {"from_user_id": UNKNOWN_ID, "to_user_id": u, "amount": 1},
        404,
        "user_not_found",
        "/transfers",
    ),
    Bad(
        "transfer-invalid-utf8",
        lambda u, o: (
            b'{"from_user_id": %d, "to_user_id": %d, "amount": 1, "description": "\xc3"}' % (u, o)
        ),
        *INVALID_JSON,
        "/transfers",
    ),
    Bad(
        "transfer-legacy-fields",
        lambda u, o: {"from": u, "to": o, "amount": 1},
        422,
        "validation_error",
        "/transfers",
    ),
    # Users.
    Bad("user-empty-name", lambda u, _: {"username": ""}, 422, "validation_error", "/users"),
    Bad("user-long-name", lambda u, _: {"username": "x" * 65}, 422, "validation_error", "/users"),
    Bad(
        "user-control-char",
        lambda u, _: {"username": "new\nline"},
        422,
        "validation_error",
        "/users",
    ),
    Bad("user-name-number", lambda u, _: {"username": 5}, 422, "validation_error", "/users"),
    Bad(
        "user-negative-overdraft",
        lambda u, _: {"username": unique(), "overdraft_limit": -1},
        422,
        "validation_error",
        "/users",
    ),
    Bad(
        "user-huge-overdraft",
        lambda u, _: {"username": unique(), "overdraft_limit": 10**30},
        422,
        "validation_error",
        "/users",
    ),
    Bad(
        "user-sets-own-balance",
        lambda u, _: {"username": unique(), "balance": 10**6},
        422,
        "validation_error",
        "/users",
    ),
    Bad(
        "user-email-nul",
        lambda u, _: {"username": unique(), "email": "a@b\x00c"},
        422,
        "validation_error",
        "/users",
    ),
    Bad(
        "user-bad-email",
        lambda u, _: {"username": unique(), "email": "not an email"},
        422,
        "validation_error",
        "/users",
    ),
]


@pytest.fixture
async def pair(client: httpx.AsyncClient) -> tuple[int, int]:
    """Two accounts: the first holds 1,000 with no overdraft."""
    first, second = await new_user(client), await new_user(client)
    await deposit(client, first["id"], 1_000)
    return first["id"], second["id"]


def _encode(body: Callable[[int, int], Any] | str | bytes, uid: int, other: int) -> bytes:
    if callable(body):
        body = body(uid, other)
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()


def _assert_problem(
    response: httpx.Response, status: int, code: str, or_else: tuple[int, str] | None = None
) -> None:
    """A problem document with this status and code (or the one other answer allowed)."""
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    problem = response.json()
    assert (response.status_code, problem["code"]) in {(status, code), or_else}, problem
    assert problem["status"] == response.status_code
    assert {"type", "title", "detail"} <= set(problem)
    assert "Traceback" not in response.text


@pytest.mark.parametrize("bad", [b.param() for b in BAD_POSTINGS])
async def test_bad_body_is_refused_and_writes_nothing(
    client: httpx.AsyncClient, database: Database, pair: tuple[int, int], bad: Bad
) -> None:
    before = await row_counts(database)
    response = await client.post(
        bad.path,
        content=_encode(bad.body, *pair),
        headers={"Content-Type": "application/json", "Idempotency-Key": unique("bad")},
    )
    _assert_problem(response, bad.status, bad.code, bad.or_else)
    assert await row_counts(database) == before


async def test_taken_username_is_refused_and_writes_nothing(
    client: httpx.AsyncClient, database: Database
) -> None:
    user = await new_user(client)
    before = await row_counts(database)
    again = await client.post("/users", json={"username": user["username"]})
    _assert_problem(again, 409, "username_taken")
    assert await row_counts(database) == before


# --- API keys -------------------------------------------------------------------------------


@pytest.fixture
async def app_client(ledger_app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client that sends no API key of its own."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=ledger_app), base_url="http://ledger.test"
    ) as c:
        yield c


async def _revoked_key(make_key: Any, database: Database) -> str:
    key: str = await make_key(Scope.ADMIN)
    async with database.write() as conn:
        await conn.execute(
            update(api_keys)
            .where(api_keys.c.prefix == key[:13])
            .values(revoked_at=api_keys.c.created_at)
        )
    return key


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="no-key"),
        pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, 401, id="basic-auth"),
        pytest.param({"Authorization": "Bearer"}, 401, id="bearer-without-key"),
        pytest.param({"Authorization": "Bearer "}, 401, id="bearer-blank"),
        pytest.param({"Authorization": "Bearer not-a-keel-key"}, 401, id="malformed-key"),
        pytest.param({"Authorization": "Bearer keel_0000_" + "A" * 43}, 401, id="unknown-key"),
        pytest.param({"X-API-Key": "keel_0000_" + "A" * 43}, 401, id="unknown-x-api-key"),
        pytest.param({"Authorization": "Bearer {revoked}"}, 401, id="revoked-key"),
        pytest.param({"Authorization": "Bearer {read}"}, 403, id="read-key-posts"),
        pytest.param({"X-API-Key": "{read}"}, 403, id="read-x-api-key-posts"),
    ],
)
async def test_posting_without_a_write_key_is_refused(
    app_client: httpx.AsyncClient,
    client: httpx.AsyncClient,
    database: Database,
    make_key: Any,
    headers: dict[str, str],
    status: int,
) -> None:
    user = await new_user(client)
    keys = {"read": await make_key(Scope.READ), "revoked": await _revoked_key(make_key, database)}
    headers = {name: value.format(**keys) for name, value in headers.items()}
    before = await row_counts(database)
    response = await app_client.post(
        "/transactions", json={"user_id": user["id"], "amount": 5}, headers=headers
    )
    _assert_problem(response, status, "unauthorized" if status == 401 else "forbidden")
    assert await row_counts(database) == before


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        pytest.param("POST", "/users", {"username": "scoped"}, id="create-user"),
        pytest.param("GET", "/audit", None, id="audit"),
    ],
)
async def test_write_key_cannot_do_admin_work(
    app_client: httpx.AsyncClient,
    database: Database,
    make_key: Any,
    method: str,
    path: str,
    body: Any,
) -> None:
    write_key = await make_key(Scope.WRITE)
    before = await row_counts(database)
    response = await app_client.request(
        method, path, json=body, headers={"Authorization": f"Bearer {write_key}"}
    )
    _assert_problem(response, 403, "forbidden")
    assert await row_counts(database) == before


async def test_read_key_reads_but_gets_401_without_key(
    app_client: httpx.AsyncClient, client: httpx.AsyncClient, make_key: Any
) -> None:
    user = await new_user(client)
    read_key = await make_key(Scope.READ)
    allowed = await app_client.get(f"/users/{user['id']}", headers={"X-API-Key": read_key})
    anonymous = await app_client.get(f"/users/{user['id']}")
    assert allowed.status_code == 200
    _assert_problem(anonymous, 401, "unauthorized")


# --- Query strings and paths ------------------------------------------------------------------


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/users/{uid}/transactions", {"cursor": "not a cursor!"}, 400, "invalid_cursor"),
        ("/users/{uid}/transactions", {"cursor": _b64("id:-1")}, 400, "invalid_cursor"),
        ("/users/{uid}/transactions", {"cursor": _b64("id:abc")}, 400, "invalid_cursor"),
        ("/users/{uid}/transactions", {"cursor": _b64("user:5")}, 400, "invalid_cursor"),
        ("/users/{uid}/transactions", {"cursor": _b64(f"id:{2**63}")}, 400, "invalid_cursor"),
        ("/users/{uid}/transactions", {"cursor": "\u00e9t\u00e9"}, 400, "invalid_cursor"),
        ("/users/{uid}/transactions", {"cursor": "A" * 201}, 422, "validation_error"),
        ("/users/{uid}/transactions", {"limit": 101}, 422, "validation_error"),
        ("/users/{uid}/transactions", {"limit": 0}, 422, "validation_error"),
        ("/users/{uid}/transactions", {"limit": -1}, 422, "validation_error"),
        ("/users/{uid}/transactions", {"limit": "ten"}, 422, "validation_error"),
        ("/users/{uid}/transactions", {"limit": 2**70}, 422, "validation_error"),
        ("/search", {"q": ""}, 422, "validation_error"),
        ("/search", {}, 422, "validation_error"),
        ("/search", {"q": "x" * 65}, 422, "validation_error"),
        ("/search", {"q": "a", "limit": 101}, 422, "validation_error"),
        ("/search", {"q": "a", "cursor": "%%%"}, 400, "invalid_cursor"),
        ("/users/0", {}, 422, "validation_error"),
        ("/users/-1", {}, 422, "validation_error"),
        ("/users/abc", {}, 422, "validation_error"),
        ("/users/1.5", {}, 422, "validation_error"),
        (f"/users/{2**63}", {}, 422, "validation_error"),
        (f"/users/{2**70}", {}, 422, "validation_error"),
        (f"/users/{UNKNOWN_ID}", {}, 404, "user_not_found"),
        (f"/users/{UNKNOWN_ID}/transactions", {}, 404, "user_not_found"),
        ("/no-such-route", {}, 404, "not_found"),
    ],
)
async def test_bad_query_or_path_is_refused(
    client: httpx.AsyncClient,
    database: Database,
    path: str,
    params: dict[str, Any],
    status: int,
    code: str,
) -> None:
    user = await new_user(client)
    before = await row_counts(database)
    response = await client.get(path.format(uid=user["id"]), params=params)
    _assert_problem(response, status, code)
    assert await row_counts(database) == before


async def test_wrong_method_is_a_problem_too(client: httpx.AsyncClient) -> None:
    _assert_problem(await client.delete("/transactions"), 405, "method_not_allowed")


async def test_valid_cursor_for_a_user_without_later_entries_is_an_empty_page(
    client: httpx.AsyncClient,
) -> None:
    user = await new_user(client)
    page = await client.get(
        f"/users/{user['id']}/transactions", params={"cursor": encode_cursor(1)}
    )
    assert page.status_code == 200
    assert page.json() == {"items": [], "next_cursor": None}


# --- Body size --------------------------------------------------------------------------------


def _oversized(total: int, uid: int) -> bytes:
    head = f'{{"user_id": {uid}, "amount": 1, "description": "'.encode()
    tail = b'"}'
    return head + b"x" * (total - len(head) - len(tail)) + tail


async def _chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def test_body_over_1_mib_with_content_length_is_refused(
    client: httpx.AsyncClient, database: Database, pair: tuple[int, int]
) -> None:
    before = await row_counts(database)
    response = await client.post(
        "/transactions",
        content=_oversized(MIB + 1, pair[0]),
        headers={"Content-Type": "application/json"},
    )
    _assert_problem(response, 413, "payload_too_large")
    assert await row_counts(database) == before


async def test_chunked_body_over_1_mib_is_refused(
    client: httpx.AsyncClient, database: Database, pair: tuple[int, int]
) -> None:
    before = await row_counts(database)
    response = await client.post(
        "/transactions",
        content=_chunks(_oversized(2 * MIB, pair[0])),
        headers={"Content-Type": "application/json"},
    )
    assert "content-length" not in response.request.headers
    _assert_problem(response, 413, "payload_too_large")
    assert await row_counts(database) == before


async def test_body_of_exactly_1_mib_is_read_and_validated(
    client: httpx.AsyncClient, pair: tuple[int, int]
) -> None:
    """The limit is inclusive: a 1 MiB body is parsed (and refused for its long description)."""
    response = await client.post(
        "/transactions",
        content=_oversized(MIB, pair[0]),
        headers={"Content-Type": "application/json"},
    )
    _assert_problem(response, 422, "validation_error")


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_1_mib_over_the_wire_is_refused(
    ledger_cluster: Cluster, cluster_db: Database, chunked: bool
) -> None:
    """The same limit through uvicorn's real HTTP parser, body still being sent."""
    async with ledger_cluster.client(connections=2) as client:
        user = await new_user(client)
        body = _oversized(2 * MIB, user["id"])
        before = await accounts(cluster_db, [user["id"]])
        response = await client.post(
            "/transactions",
            content=_chunks(body) if chunked else body,
            headers={"Content-Type": "application/json"},
        )
    _assert_problem(response, 413, "payload_too_large")
    assert await accounts(cluster_db, [user["id"]]) == before


# --- Properties -------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from([0, 1, -1, MAX_AMOUNT, MAX_AMOUNT + 1, -MAX_AMOUNT, 2**63, 1.0, -0.0]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


def _valid_amount(value: Any) -> bool:
    return type(value) is int and value != 0 and -MAX_AMOUNT <= value <= MAX_AMOUNT


def _refusals(value: Any) -> set[tuple[int, str]]:
    """Right answers to a wrong value: 422, or 400 too if it holds NaN or an infinity."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return {VALIDATION, INVALID_JSON}
    return {VALIDATION}


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(amount=JSON_VALUES)
async def test_any_json_amount_is_never_a_5xx_and_writes_only_when_valid(
    client: httpx.AsyncClient, database: Database, pair: tuple[int, int], amount: Any
) -> None:
    uid = pair[0]
    before_counts = await row_counts(database)
    before = (await accounts(database, [uid]))[uid].balance
    response = await client.post(
        "/transactions",
        content=json.dumps({"user_id": uid, "amount": amount}),  # NaN/Infinity tokens too
        headers={"Content-Type": "application/json"},
    )
    after = (await accounts(database, [uid]))[uid].balance
    assert response.status_code < 500, response.text
    if response.status_code == 201:
        assert _valid_amount(amount)
        assert after == before + amount == response.json()["balance_after"]
        return
    assert response.headers["content-type"].startswith("application/problem+json")
    if _valid_amount(amount):
        assert response.json()["code"] == "insufficient_funds"
        assert before + amount < 0
    else:
        assert (response.status_code, response.json()["code"]) in _refusals(amount)
    assert after == before
    assert await row_counts(database) == before_counts


NOT_AN_EXISTING_ID = (
    JSON_VALUES.filter(lambda v: type(v) is not int)
    | st.integers(max_value=0)
    | st.integers(min_value=UNKNOWN_ID, max_value=2**80)
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(user_id=NOT_AN_EXISTING_ID)
async def test_any_json_user_id_is_never_a_5xx_and_never_writes(
    client: httpx.AsyncClient, database: Database, user_id: Any
) -> None:
    before = await row_counts(database)
    response = await client.post(
        "/transactions",
        content=json.dumps({"user_id": user_id, "amount": 1}),
        headers={"Content-Type": "application/json"},
    )
    answer = (response.status_code, response.json()["code"])
    valid_id = type(user_id) is int and 1 <= user_id <= MAX_ID
    assert answer in ({(404, "user_not_found")} if valid_id else _refusals(user_id)), answer
    assert await row_counts(database) == before
