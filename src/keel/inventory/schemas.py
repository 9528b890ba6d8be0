"""The inventory's request and response bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from keel.core.schemas import MAX_ID, Id, below_2_63

MAX_STOCK = 2**62  # far inside BIGINT: no sum of in-range counts can overflow
Count = Annotated[StrictInt, Field(ge=0, le=MAX_STOCK)]
Quantity = Annotated[StrictInt, Field(ge=1, le=1_000_000, description="Units, at least 1.")]
# A buyer's id as the shop knows it: a string, or an integer (kept as its decimal string).
UserId = (
    Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
    | Annotated[StrictInt, Field(ge=-(2**63), le=MAX_ID, json_schema_extra=below_2_63)]
)


def user_key(user_id: str | int) -> str:
    return user_id if isinstance(user_id, str) else str(user_id)


class ItemCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sku: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")]
    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
    stock: Count
    max_per_user: Annotated[StrictInt, Field(ge=1, le=MAX_STOCK)] | None = Field(
        default=None, description="Units one user may hold and buy in total; absent: no limit."
    )


class Item(BaseModel):
    id: int
    sku: str
    name: str
    available: int = Field(description="Units anyone may buy or hold now.")
    reserved: int = Field(description="Units held by unexpired reservations.")
    sold: int = Field(description="Units in placed (not cancelled) orders.")
    initial: int
    restocked: int
    max_per_user: int | None
    created_at: datetime


class Restock(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quantity: Annotated[StrictInt, Field(ge=1, le=MAX_STOCK)]


class PurchaseCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: Id
    user_id: UserId
    quantity: Quantity = 1


class Order(BaseModel):
    order_id: int
    item_id: int
    user_id: str
    quantity: int
    state: str = Field(description="`placed`, or `cancelled`.")
    remaining: int | None = Field(
        default=None, description="Units still available right after this order was placed."
    )
    reservation_id: int | None = None
    created_at: datetime
    cancelled_at: datetime | None = None


class ReservationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: Id
    user_id: UserId
    quantity: Quantity = 1
    ttl_seconds: Annotated[
        StrictInt, Field(ge=1, le=900, description="How long to hold, ≤ 900 s.")
    ] = 300


class Reservation(BaseModel):
    reservation_id: int
    item_id: int
    user_id: str
    quantity: int
    state: str = Field(description="`held`, `confirmed`, `released` or `expired`.")
    expires_at: datetime
    order_id: int | None = None
