"""The inventory's problems, each with its stable ``code``."""

from __future__ import annotations

from keel.core.errors import Conflict, NotFound, UnprocessableEntity


class ItemNotFound(NotFound):
    code, title = "item_not_found", "No such item"


class OrderNotFound(NotFound):
    code, title = "order_not_found", "No such order"


class ReservationNotFound(NotFound):
    code, title = "reservation_not_found", "No such reservation"


class SoldOut(Conflict):
    code, title = "sold_out", "Not enough stock"


class LimitExceeded(Conflict):
    code, title = "limit_exceeded", "Per-user purchase limit reached"


class SkuTaken(Conflict):
    code, title = "sku_taken", "An item with this SKU exists"


class AlreadyCancelled(Conflict):
    code, title = "already_cancelled", "The order is already cancelled"


class ReservationExpired(Conflict):
    code, title = "reservation_expired", "The hold has expired"


class ReservationReleased(Conflict):
    code, title = "reservation_released", "The hold was released"


class ReservationConfirmed(Conflict):
    code, title = "reservation_confirmed", "The hold was already confirmed"


class StockOutOfRange(UnprocessableEntity):
    code, title = "stock_out_of_range", "Stock would exceed the largest count keel keeps"
