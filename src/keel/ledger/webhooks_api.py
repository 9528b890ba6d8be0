"""Webhook visibility: what the outbox worker delivered, is retrying, or gave up on (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from keel.core.app import AdminKey, PlatformDep
from keel.core.errors import Forbidden, InvalidCursor, RateLimited, Unauthorized, problem_responses
from keel.core.schemas import MAX_ID, Cursor, Limit, Page, decode_cursor
from keel.ledger import outbox_store
from keel.ledger.outbox_store import DeliveryState
from keel.ledger.schemas import Delivery

router = APIRouter(tags=["webhooks"])


@router.get(
    "/webhooks/deliveries",
    response_model=Page[Delivery],
    summary="Webhook deliveries, newest first (admin)",
    responses=problem_responses(Unauthorized, Forbidden, RateLimited, InvalidCursor),
)
async def list_deliveries(
    _key: AdminKey,
    plat: PlatformDep,
    state: Annotated[
        DeliveryState | None, Query(description="Only deliveries in this state.")
    ] = None,
    event_id: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="Only deliveries of this outbox event.")
    ] = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> Page[Delivery]:
    before = decode_cursor(cursor)
    async with plat.database.read() as conn:
        return await outbox_store.list_deliveries(
            conn, state=state, event_id=event_id, limit=limit, before_id=before
        )
