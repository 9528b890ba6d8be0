"""The inventory's HTTP routes (contract: DESIGN.md, "inventory")."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Request
from starlette.responses import Response

from keel.core.batching import GroupCommitter
from keel.core.errors import InvalidCursor, problem_responses
from keel.core.idempotency import StoredResponse
from keel.core.openapi import IDEMPOTENT
from keel.core.platform import AdminKey, PlatformDep, ReadKey, WriteKey
from keel.core.routing import router as keel_router
from keel.core.schemas import Cursor, Limit, Page, decode_cursor
from keel.inventory import service
from keel.inventory.errors import (
    AlreadyCancelled,
    ItemNotFound,
    LimitExceeded,
    OrderNotFound,
    ReservationConfirmed,
    ReservationExpired,
    ReservationNotFound,
    ReservationReleased,
    SkuTaken,
    SoldOut,
    StockOutOfRange,
)
from keel.inventory.purchases import Purchase
from keel.inventory.schemas import (
    Item,
    ItemCreate,
    Order,
    PurchaseCreate,
    Reservation,
    ReservationCreate,
    Restock,
    user_key,
)
from keel.inventory.settings import InventorySettings

router = keel_router()

PathId = Annotated[int, Path(ge=1, lt=2**63)]  # lt: 2**63 - 1 is not exact as a float
PurchaseCommitter = GroupCommitter[Purchase, Order | StoredResponse]


def _link(
    operation_id: str, *, body: dict[str, str] | None = None, **parameters: str
) -> dict[str, object]:
    """An OpenAPI link: what a response leads to (clients and the fuzzer's stateful phase
    follow them: a new item is read, bought and held; a hold is confirmed or released)."""
    link: dict[str, object] = {"operationId": operation_id}
    if parameters:
        link["parameters"] = parameters
    if body:
        link["requestBody"] = body
    return link


_ITEM = "$response.body#/id"
ITEM_LINKS = {
    "GetItem": _link("get_item_items__item_id__get", item_id=_ITEM),
    "RestockItem": _link("restock_items__item_id__restock_post", item_id=_ITEM),
    "ListItemOrders": _link("list_orders_items__item_id__orders_get", item_id=_ITEM),
    "BuyItem": _link("purchase_purchase_post", body={"item_id": _ITEM}),
    "HoldItem": _link("create_reservation_reservations_post", body={"item_id": _ITEM}),
}
_ORDER = "$response.body#/order_id"
ORDER_LINKS = {
    "CancelOrder": _link("cancel_order_orders__order_id__cancel_post", order_id=_ORDER),
    "ListItemOrders": _link(
        "list_orders_items__item_id__orders_get", item_id="$response.body#/item_id"
    ),
}
_HOLD = "$response.body#/reservation_id"
HOLD_LINKS = {
    "GetReservation": _link(
        "get_reservation_reservations__reservation_id__get", reservation_id=_HOLD
    ),
    "ConfirmReservation": _link(
        "confirm_reservation_reservations__reservation_id__confirm_post", reservation_id=_HOLD
    ),
    "ReleaseReservation": _link(
        "release_reservation_reservations__reservation_id__delete", reservation_id=_HOLD
    ),
}
RELEASED_LINKS = {  # a released hold cannot be confirmed: 409 reservation_released
    "ConfirmReleased": _link(
        "confirm_reservation_reservations__reservation_id__confirm_post",
        reservation_id="$request.path.reservation_id",
    ),
}


def _json(body: str, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type="application/json")


@router.post(
    "/items",
    status_code=201,
    response_model=Item,
    tags=["items"],
    summary="Add an item with its initial stock (admin)",
    responses={201: {"links": ITEM_LINKS}, **problem_responses(SkuTaken)},
    openapi_extra=IDEMPOTENT,
)
async def create_item(
    body: ItemCreate, request: Request, key: AdminKey, plat: PlatformDep
) -> Response:
    idem = plat.idempotency.request(
        request.headers, key.id, "inventory.create_item", body.model_dump()
    )
    return await plat.idempotency.run(
        plat.database, idem, lambda conn: conn.run_sync(service.create_item, body)
    )


@router.get(
    "/items/{item_id}",
    response_model=Item,
    tags=["items"],
    summary="One item: available, reserved and sold",
    responses=problem_responses(ItemNotFound),
)
async def get_item(item_id: PathId, _key: ReadKey, plat: PlatformDep) -> Response:
    item = await plat.database.run_read(lambda conn: service.get_item(conn, item_id))
    return _json(item.model_dump_json())


@router.get(
    "/items",
    response_model=Page[Item],
    tags=["items"],
    summary="Items in id order",
    responses=problem_responses(InvalidCursor),
)
async def list_items(
    _key: ReadKey, plat: PlatformDep, limit: Limit = 50, cursor: Cursor = None
) -> Page[Item]:
    after = decode_cursor(cursor)
    async with plat.database.read() as conn:
        return await conn.run_sync(service.list_items, after, limit)


@router.post(
    "/items/{item_id}/restock",
    response_model=Item,
    tags=["items"],
    summary="Add stock (admin)",
    responses={200: {"links": ITEM_LINKS}, **problem_responses(ItemNotFound, StockOutOfRange)},
    openapi_extra=IDEMPOTENT,
)
async def restock(
    item_id: PathId, body: Restock, request: Request, key: AdminKey, plat: PlatformDep
) -> Response:
    idem = plat.idempotency.request(
        request.headers, key.id, "inventory.restock", {"item_id": item_id, **body.model_dump()}
    )
    return await plat.idempotency.run(
        plat.database,
        idem,
        lambda conn: conn.run_sync(service.restock, item_id, body.quantity),
        status=200,
    )


@router.get(
    "/items/{item_id}/orders",
    response_model=Page[Order],
    tags=["orders"],
    summary="An item's orders, oldest first",
    responses=problem_responses(ItemNotFound, InvalidCursor),
)
async def list_orders(
    item_id: PathId, _key: ReadKey, plat: PlatformDep, limit: Limit = 50, cursor: Cursor = None
) -> Page[Order]:
    after = decode_cursor(cursor)
    async with plat.database.read() as conn:
        return await conn.run_sync(service.list_orders, item_id, after, limit)


@router.post(
    "/purchase",
    status_code=201,
    response_model=Order,
    tags=["orders"],
    summary="Buy now: 201 with the order and the stock left, or 409 sold_out / limit_exceeded",
    responses={
        201: {"links": ORDER_LINKS},
        **problem_responses(ItemNotFound, SoldOut, LimitExceeded),
    },
    openapi_extra=IDEMPOTENT,
)
async def purchase(
    body: PurchaseCreate, request: Request, key: WriteKey, plat: PlatformDep
) -> Response:
    idem = plat.idempotency.request(
        request.headers, key.id, "inventory.purchase", body.model_dump()
    )
    committer: PurchaseCommitter = plat.services["purchases"]
    buying = Purchase(body.item_id, user_key(body.user_id), body.quantity, idem)
    return await plat.idempotency.submit(committer, buying, idem)


@router.post(
    "/reservations",
    status_code=201,
    response_model=Reservation,
    tags=["reservations"],
    summary="Hold stock for up to 900 s",
    responses={
        201: {"links": HOLD_LINKS},
        **problem_responses(ItemNotFound, SoldOut, LimitExceeded),
    },
    openapi_extra=IDEMPOTENT,
)
async def create_reservation(
    body: ReservationCreate, request: Request, key: WriteKey, plat: PlatformDep
) -> Response:
    settings = plat.settings
    assert isinstance(settings, InventorySettings)
    idem = plat.idempotency.request(request.headers, key.id, "inventory.reserve", body.model_dump())
    return await plat.idempotency.run(
        plat.database,
        idem,
        lambda conn: conn.run_sync(
            service.reserve, body, user_key(body.user_id), settings.max_hold_seconds
        ),
    )


@router.get(
    "/reservations/{reservation_id}",
    response_model=Reservation,
    tags=["reservations"],
    summary="One hold; past its time it reads as expired",
    responses=problem_responses(ReservationNotFound),
)
async def get_reservation(reservation_id: PathId, _key: ReadKey, plat: PlatformDep) -> Response:
    held = await plat.database.run_read(lambda conn: service.get_reservation(conn, reservation_id))
    return _json(held.model_dump_json())


@router.post(
    "/reservations/{reservation_id}/confirm",
    status_code=201,
    response_model=Order,
    tags=["reservations"],
    summary="Turn an unexpired hold into an order",
    responses={
        201: {"links": ORDER_LINKS},
        **problem_responses(
            ReservationNotFound, ReservationExpired, ReservationReleased, ReservationConfirmed
        ),
    },
    openapi_extra=IDEMPOTENT,
)
async def confirm_reservation(
    reservation_id: PathId, request: Request, key: WriteKey, plat: PlatformDep
) -> Response:
    idem = plat.idempotency.request(
        request.headers, key.id, "inventory.confirm", {"reservation_id": reservation_id}
    )
    return await plat.idempotency.run(
        plat.database, idem, lambda conn: conn.run_sync(service.confirm, reservation_id)
    )


@router.delete(
    "/reservations/{reservation_id}",
    status_code=204,
    tags=["reservations"],
    summary="Release a hold (again: no change)",
    responses={
        204: {"links": RELEASED_LINKS},
        **problem_responses(ReservationNotFound, ReservationExpired, ReservationConfirmed),
    },
)
async def release_reservation(
    reservation_id: PathId, _key: WriteKey, plat: PlatformDep
) -> Response:
    async with plat.database.write() as conn:
        await conn.run_sync(service.release, reservation_id)
    return Response(status_code=204)


@router.post(
    "/orders/{order_id}/cancel",
    response_model=Order,
    tags=["orders"],
    summary="Cancel an order and return its stock (twice: 409 already_cancelled)",
    responses={
        200: {"links": {"CancelAgain": ORDER_LINKS["CancelOrder"]}},
        **problem_responses(OrderNotFound, AlreadyCancelled),
    },
)
async def cancel_order(order_id: PathId, _key: WriteKey, plat: PlatformDep) -> Response:
    async with plat.database.write() as conn:
        order = await conn.run_sync(service.cancel, order_id)
    return _json(order.model_dump_json())
