"""Bad input: each request below gets a 4xx problem with a stable code, and changes nothing.

Each test sets a scene (an item with a per-user limit, a hold, a released hold, a confirmed hold
and its order, a cancelled order), then sends one bad request. "Changes nothing" is read from the
database: the scene's items, holds, orders, holdings and outbox events, and the request's
Idempotency-Key (a refusal must not store it), are the same before and after.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from keel.core.database import Database
from keel.core.outbox.tables import events as outbox
from keel.core.tables import idempotency_keys
from keel.inventory.schemas import MAX_STOCK
from keel.inventory.tables import holdings, items, orders, reservations
from tests.inventory.test_basics import new_item

UNKNOWN = 2**62  # a valid id no test reaches
VALIDATION = (422, "validation_error")


@dataclass
class Scene:
    item: int
    other: int  # a second item, for the SKU taken
    sku: str
    held: int
    released: int
    confirmed: int
    order: int
    cancelled: int
    outbox_from: int

    @property
    def ids(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int)}


async def _hold(shop: httpx.AsyncClient, item: int, **extra: Any) -> int:
    body = {"item_id": item, "user_id": "scene", "quantity": 1, "ttl_seconds": 900, **extra}
    reply = await shop.post("/reservations", json=body)
    assert reply.status_code == 201, reply.text
    return int(reply.json()["reservation_id"])


async def _last_outbox_id(database: Database) -> int:
    async with database.read() as conn:
        found = (await conn.execute(select(outbox.c.id).order_by(outbox.c.id.desc()))).first()
    return 0 if found is None else int(found.id)


@pytest.fixture
async def scene(shop: httpx.AsyncClient, database: Database) -> Scene:
    outbox_from = await _last_outbox_id(database)
    item = await new_item(shop, 10, max_per_user=5)
    other = await new_item(shop, 1)
    held, released, confirmed = [await _hold(shop, item["id"]) for _ in range(3)]
    assert (await shop.delete(f"/reservations/{released}")).status_code == 204
    order = (await shop.post(f"/reservations/{confirmed}/confirm")).json()["order_id"]
    bought = await shop.post("/purchase", json={"item_id": item["id"], "user_id": "scene"})
    cancelled = bought.json()["order_id"]
    assert (await shop.post(f"/orders/{cancelled}/cancel")).status_code == 200
    return Scene(
        item["id"],
        other["id"],
        other["sku"],
        held,
        released,
        confirmed,
        order,
        cancelled,
        outbox_from,
    )


async def snapshot(database: Database, scene: Scene, idempotency_key: str) -> dict[str, Any]:
    """Everything of the scene's a request could change, read in one transaction."""
    ids = [scene.item, scene.other]
    async with database.read() as conn:

        async def rows(table: Any, column: Any) -> list[tuple[Any, ...]]:
            found = await conn.execute(select(table).where(column.in_(ids)))
            return sorted(tuple(row) for row in found)

        events = await conn.execute(
            select(outbox.c.event_type, outbox.c.payload).where(
                outbox.c.service == "inventory", outbox.c.id > scene.outbox_from
            )
        )
        keys = await conn.execute(
            select(idempotency_keys.c.key).where(idempotency_keys.c.key == idempotency_key)
        )
        return {
            "items": await rows(items, items.c.id),
            "holds": await rows(reservations, reservations.c.item_id),
            "orders": await rows(orders, orders.c.item_id),
            "holdings": await rows(holdings, holdings.c.item_id),
            "events": sorted(
                (kind, payload)
                for kind, payload in events
                if json.loads(payload).get("item_id") in ids
            ),
            "idempotency_keys": keys.all(),
        }


@dataclass(frozen=True)
class Bad:
    name: str
    method: str
    path: str  # formatted with the scene's ids and {unknown}
    body: Any  # JSON, formatted likewise where a string value is "{…}"; bytes go as they are
    answer: tuple[int, str]

    def param(self) -> Any:
        return pytest.param(self, id=self.name)


def _fill(value: Any, ids: dict[str, int]) -> Any:
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return ids[value[1:-1]]
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


def _buy(**fields: Any) -> dict[str, Any]:
    return {"item_id": "{item}", "user_id": "u", **fields}


def _hold_body(**fields: Any) -> dict[str, Any]:
    return {"item_id": "{item}", "user_id": "u", "quantity": 1, "ttl_seconds": 60, **fields}


def _new_item(**fields: Any) -> dict[str, Any]:
    return {"sku": f"bad-{uuid.uuid4().hex[:8]}", "name": "Bad", "stock": 1, **fields}


QUANTITIES: list[tuple[str, Any]] = [
    ("zero", 0),
    ("negative", -1),
    ("huge", 10**9),
    ("float", 1.5),
    ("string", "2"),
    ("bool", True),
    ("null", None),
]
BAD = [
    *(
        Bad(f"purchase-quantity-{n}", "POST", "/purchase", _buy(quantity=q), VALIDATION)
        for n, q in QUANTITIES
    ),
    *(
        Bad(f"reserve-quantity-{n}", "POST", "/reservations", _hold_body(quantity=q), VALIDATION)
        for n, q in QUANTITIES
    ),
    *(
        Bad(f"restock-quantity-{n}", "POST", "/items/{item}/restock", {"quantity": q}, VALIDATION)
        # A restock may be huge (up to MAX_STOCK, stock_out_of_range past the item's room).
        for n, q in [*(nq for nq in QUANTITIES if nq[0] != "huge"), ("huge", MAX_STOCK + 1)]
    ),
    Bad(
        "restock-past-max",
        "POST",
        "/items/{item}/restock",
        {"quantity": MAX_STOCK},
        (422, "stock_out_of_range"),
    ),
    Bad(
        "purchase-unknown-item",
        "POST",
        "/purchase",
        _buy(item_id="{unknown}"),
        (404, "item_not_found"),
    ),
    Bad(
        "reserve-unknown-item",
        "POST",
        "/reservations",
        _hold_body(item_id="{unknown}"),
        (404, "item_not_found"),
    ),
    Bad(
        "restock-unknown-item",
        "POST",
        "/items/{unknown}/restock",
        {"quantity": 1},
        (404, "item_not_found"),
    ),
    Bad("orders-of-unknown-item", "GET", "/items/{unknown}/orders", None, (404, "item_not_found")),
    Bad("get-unknown-item", "GET", "/items/{unknown}", None, (404, "item_not_found")),
    Bad("ttl-over-900", "POST", "/reservations", _hold_body(ttl_seconds=901), VALIDATION),
    Bad("ttl-zero", "POST", "/reservations", _hold_body(ttl_seconds=0), VALIDATION),
    Bad("ttl-string", "POST", "/reservations", _hold_body(ttl_seconds="60"), VALIDATION),
    Bad(
        "confirm-released",
        "POST",
        "/reservations/{released}/confirm",
        None,
        (409, "reservation_released"),
    ),
    Bad(
        "confirm-confirmed",
        "POST",
        "/reservations/{confirmed}/confirm",
        None,
        (409, "reservation_confirmed"),
    ),
    Bad(
        "release-confirmed",
        "DELETE",
        "/reservations/{confirmed}",
        None,
        (409, "reservation_confirmed"),
    ),
    Bad(
        "confirm-unknown",
        "POST",
        "/reservations/{unknown}/confirm",
        None,
        (404, "reservation_not_found"),
    ),
    Bad(
        "release-unknown", "DELETE", "/reservations/{unknown}", None, (404, "reservation_not_found")
    ),
    Bad("cancel-twice", "POST", "/orders/{cancelled}/cancel", None, (409, "already_cancelled")),
    Bad("cancel-unknown", "POST", "/orders/{unknown}/cancel", None, (404, "order_not_found")),
    Bad("over-the-limit", "POST", "/purchase", _buy(quantity=6), (409, "limit_exceeded")),
    Bad(
        "more-than-left",
        "POST",
        "/purchase",
        _buy(item_id="{other}", quantity=2),
        (409, "sold_out"),
    ),
    Bad("item-id-string", "POST", "/purchase", _buy(item_id="1"), VALIDATION),
    Bad("item-id-zero", "POST", "/purchase", _buy(item_id=0), VALIDATION),
    Bad("item-id-over-int64", "POST", "/purchase", _buy(item_id=2**63), VALIDATION),
    Bad("user-id-bool", "POST", "/purchase", _buy(user_id=True), VALIDATION),
    Bad("user-id-over-int64", "POST", "/purchase", _buy(user_id=2**63), VALIDATION),
    Bad("user-id-null", "POST", "/purchase", _buy(user_id=None), VALIDATION),
    Bad("user-id-object", "POST", "/reservations", _hold_body(user_id={"id": 1}), VALIDATION),
    Bad("user-id-empty", "POST", "/purchase", _buy(user_id=""), VALIDATION),
    Bad("user-id-too-long", "POST", "/purchase", _buy(user_id="u" * 129), VALIDATION),
    Bad("user-id-control", "POST", "/purchase", _buy(user_id="a\nb"), VALIDATION),
    Bad("missing-user-id", "POST", "/purchase", {"item_id": "{item}"}, VALIDATION),
    Bad("purchase-unknown-field", "POST", "/purchase", _buy(price=1), VALIDATION),
    Bad("reserve-unknown-field", "POST", "/reservations", _hold_body(hold=True), VALIDATION),
    Bad(
        "restock-unknown-field",
        "POST",
        "/items/{item}/restock",
        {"quantity": 1, "why": "x"},
        VALIDATION,
    ),
    Bad("item-unknown-field", "POST", "/items", _new_item(colour="red"), VALIDATION),
    Bad("item-stock-negative", "POST", "/items", _new_item(stock=-1), VALIDATION),
    Bad("item-stock-float", "POST", "/items", _new_item(stock=1.0), VALIDATION),
    Bad("item-limit-zero", "POST", "/items", _new_item(max_per_user=0), VALIDATION),
    Bad("item-sku-int", "POST", "/items", _new_item(sku=12), VALIDATION),
    Bad("item-sku-space", "POST", "/items", _new_item(sku="a b"), VALIDATION),
    Bad("item-name-empty", "POST", "/items", _new_item(name=""), VALIDATION),
    Bad("sku-taken", "POST", "/items", "sku-taken", (409, "sku_taken")),
    Bad("malformed-json", "POST", "/purchase", b'{"item_id": 1, ', (400, "invalid_json")),
    Bad("malformed-json-reserve", "POST", "/reservations", b"{", (400, "invalid_json")),
    Bad("array-body", "POST", "/purchase", [1, "u"], VALIDATION),
    Bad("null-body", "POST", "/reservations", None, VALIDATION),
    Bad("path-id-zero", "POST", "/orders/0/cancel", None, VALIDATION),
    Bad("path-id-text", "GET", "/reservations/abc", None, VALIDATION),
    Bad("path-id-over-int64", "POST", f"/reservations/{2**63}/confirm", None, VALIDATION),
    Bad("limit-zero", "GET", "/items/{item}/orders?limit=0", None, VALIDATION),
    Bad("bad-cursor", "GET", "/items/{item}/orders?cursor=%21%21", None, (400, "invalid_cursor")),
]


async def _send(shop: httpx.AsyncClient, bad: Bad, scene: Scene, key: str) -> httpx.Response:
    ids = {**scene.ids, "unknown": UNKNOWN}
    path = bad.path.format(**ids)
    headers = {"Idempotency-Key": key}
    if bad.body == "sku-taken":
        body: Any = _new_item(sku=scene.sku)
    elif bad.method == "GET" or (bad.body is None and bad.name != "null-body"):
        return await shop.request(bad.method, path, headers=headers)
    else:
        body = _fill(bad.body, ids)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers["Content-Type"] = "application/json"
    return await shop.request(bad.method, path, content=content, headers=headers)


@pytest.mark.parametrize("bad", [b.param() for b in BAD])
async def test_refused_with_a_stable_code_and_nothing_changes(
    shop: httpx.AsyncClient, database: Database, scene: Scene, bad: Bad
) -> None:
    key = f"bad-{uuid.uuid4().hex}"
    before = await snapshot(database, scene, key)
    reply = await _send(shop, bad, scene, key)
    assert (reply.status_code, reply.json().get("code")) == bad.answer, reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")
    assert await snapshot(database, scene, key) == before


async def test_an_expired_hold_is_refused_and_changes_nothing(
    shop: httpx.AsyncClient, database: Database, scene: Scene
) -> None:
    """Confirming or releasing a hold the sweeper has expired: 409 ``reservation_expired``."""
    expiring = await _hold(shop, scene.item, ttl_seconds=1)
    deadline = asyncio.get_running_loop().time() + 10
    while (await shop.get(f"/reservations/{expiring}")).json()["state"] != "expired" or (
        await shop.get(f"/items/{scene.item}")
    ).json()["reserved"] != 1:  # the scene's own hold is all that is still reserved
        assert asyncio.get_running_loop().time() < deadline, "the sweeper never returned the hold"
        await asyncio.sleep(0.05)
    key = f"bad-{uuid.uuid4().hex}"
    before = await snapshot(database, scene, key)
    for method, path in [
        ("POST", f"/reservations/{expiring}/confirm"),
        ("DELETE", f"/reservations/{expiring}"),
    ]:
        reply = await shop.request(method, path, headers={"Idempotency-Key": key})
        assert (reply.status_code, reply.json()["code"]) == (409, "reservation_expired")
        assert await snapshot(database, scene, key) == before


async def test_a_restock_of_a_full_item_is_refused_not_overflowed(shop: httpx.AsyncClient) -> None:
    """An item at MAX_STOCK restocked by MAX_STOCK: the check's own sum was 2**63, one past
    BIGINT, and PostgreSQL refused the statement (503 database_unavailable, a false outage)."""
    item = await new_item(shop, MAX_STOCK)
    reply = await shop.post(f"/items/{item['id']}/restock", json={"quantity": MAX_STOCK})
    assert (reply.status_code, reply.json()["code"]) == (422, "stock_out_of_range"), reply.text
    assert (await shop.get(f"/items/{item['id']}")).json()["restocked"] == 0
