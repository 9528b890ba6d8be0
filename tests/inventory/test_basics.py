"""Items, purchases, holds and cancels, each checked against the item's counts."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx


async def new_item(shop: httpx.AsyncClient, stock: int, **extra: Any) -> dict[str, Any]:
    reply = await shop.post(
        "/items",
        json={"sku": f"sku-{uuid.uuid4().hex[:12]}", "name": "Widget", "stock": stock, **extra},
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


async def counts(shop: httpx.AsyncClient, item_id: int) -> tuple[int, int, int]:
    item = (await shop.get(f"/items/{item_id}")).json()
    assert (
        item["available"] + item["reserved"] + item["sold"] == item["initial"] + item["restocked"]
    )
    return item["available"], item["reserved"], item["sold"]


async def test_concurrent_buyers_get_exactly_the_stock(shop: httpx.AsyncClient) -> None:
    item = await new_item(shop, 10)
    replies = await asyncio.gather(
        *(
            shop.post("/purchase", json={"item_id": item["id"], "user_id": f"b{i}"})
            for i in range(50)
        )
    )
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(201) == 10 and statuses.count(409) == 40
    assert {r.json()["code"] for r in replies if r.status_code == 409} == {"sold_out"}
    assert sorted(r.json()["remaining"] for r in replies if r.status_code == 201) == list(range(10))
    assert await counts(shop, item["id"]) == (0, 0, 10)


async def test_per_user_limit(shop: httpx.AsyncClient) -> None:
    item = await new_item(shop, 100, max_per_user=2)
    replies = await asyncio.gather(
        *(shop.post("/purchase", json={"item_id": item["id"], "user_id": 7}) for _ in range(5))
    )
    assert sorted(r.status_code for r in replies) == [201, 201, 409, 409, 409]
    assert {r.json()["code"] for r in replies if r.status_code == 409} == {"limit_exceeded"}
    assert await counts(shop, item["id"]) == (98, 0, 2)


async def test_unknown_item_and_bad_quantities(shop: httpx.AsyncClient) -> None:
    reply = await shop.post("/purchase", json={"item_id": 10**12, "user_id": "x"})
    assert (reply.status_code, reply.json()["code"]) == (404, "item_not_found")
    item = await new_item(shop, 5)
    for quantity in (0, -1, 10**9, 1.5, "2"):
        reply = await shop.post(
            "/purchase", json={"item_id": item["id"], "user_id": "x", "quantity": quantity}
        )
        assert (reply.status_code, reply.json()["code"]) == (422, "validation_error"), quantity
    assert await counts(shop, item["id"]) == (5, 0, 0)


async def test_idempotent_retry_buys_once(shop: httpx.AsyncClient) -> None:
    item = await new_item(shop, 3)
    body = {"item_id": item["id"], "user_id": "r"}
    first, second = await asyncio.gather(
        *(shop.post("/purchase", json=body, headers={"Idempotency-Key": "buy-1"}) for _ in range(2))
    )
    statuses = sorted([first.status_code, second.status_code])
    assert statuses in ([201, 201], [201, 409])
    again = await shop.post("/purchase", json=body, headers={"Idempotency-Key": "buy-1"})
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert await counts(shop, item["id"]) == (2, 0, 1)


async def test_hold_confirm_release_cancel_restock(shop: httpx.AsyncClient) -> None:
    item = await new_item(shop, 5)
    hold = (
        await shop.post(
            "/reservations",
            json={"item_id": item["id"], "user_id": "h", "quantity": 2, "ttl_seconds": 60},
        )
    ).json()
    assert await counts(shop, item["id"]) == (3, 2, 0)
    order = await shop.post(f"/reservations/{hold['reservation_id']}/confirm")
    assert order.status_code == 201, order.text
    assert await counts(shop, item["id"]) == (3, 0, 2)
    again = await shop.post(f"/reservations/{hold['reservation_id']}/confirm")
    assert (again.status_code, again.json()["code"]) == (409, "reservation_confirmed")

    other = (
        await shop.post(
            "/reservations", json={"item_id": item["id"], "user_id": "h", "quantity": 3}
        )
    ).json()
    assert (await shop.delete(f"/reservations/{other['reservation_id']}")).status_code == 204
    assert (await shop.delete(f"/reservations/{other['reservation_id']}")).status_code == 204
    released = await shop.post(f"/reservations/{other['reservation_id']}/confirm")
    assert (released.status_code, released.json()["code"]) == (409, "reservation_released")
    assert await counts(shop, item["id"]) == (3, 0, 2)

    cancelled = await shop.post(f"/orders/{order.json()['order_id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    twice = await shop.post(f"/orders/{order.json()['order_id']}/cancel")
    assert (twice.status_code, twice.json()["code"]) == (409, "already_cancelled")
    assert await counts(shop, item["id"]) == (5, 0, 0)

    restocked = await shop.post(f"/items/{item['id']}/restock", json={"quantity": 10})
    assert restocked.status_code == 200 and restocked.json()["available"] == 15
    orders = (await shop.get(f"/items/{item['id']}/orders")).json()
    assert [o["state"] for o in orders["items"]] == ["cancelled"]


async def test_an_expired_hold_is_refused_before_and_returned_by_the_sweeper(
    shop: httpx.AsyncClient,
) -> None:
    item = await new_item(shop, 4)
    hold = (
        await shop.post(
            "/reservations",
            json={"item_id": item["id"], "user_id": "e", "quantity": 4, "ttl_seconds": 1},
        )
    ).json()
    assert await counts(shop, item["id"]) == (0, 4, 0)
    deadline = asyncio.get_running_loop().time() + 10
    while (await shop.get(f"/reservations/{hold['reservation_id']}")).json()["state"] != "expired":
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    confirm = await shop.post(f"/reservations/{hold['reservation_id']}/confirm")
    assert (confirm.status_code, confirm.json()["code"]) == (409, "reservation_expired")
    while await counts(shop, item["id"]) != (4, 0, 0):  # the sweeper returns it within a second
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
