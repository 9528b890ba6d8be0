"""Webhook visibility: what the outbox worker delivered, is retrying, or gave up on (admin)."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query

from keel.core.errors import InvalidCursor, problem_responses
from keel.core.outbox import store
from keel.core.outbox.schemas import Delivery
from keel.core.outbox.store import DeliveryState
from keel.core.platform import AdminKey, PlatformDep
from keel.core.routing import router as keel_router
from keel.core.schemas import Cursor, Limit, Page, decode_cursor


def deliveries_router(service: str) -> APIRouter:
    """``GET /webhooks/deliveries``, listing ``service``'s deliveries only."""
    router = keel_router(tags=["webhooks"])

    @router.get(
        "/webhooks/deliveries",
        response_model=Page[Delivery],
        summary="Webhook deliveries, newest first (admin)",
        responses=problem_responses(InvalidCursor),
    )
    async def list_deliveries(
        _key: AdminKey,
        plat: PlatformDep,
        state: Annotated[
            DeliveryState | None, Query(description="Only deliveries in this state.")
        ] = None,
        event_id: Annotated[
            UUID | None, Query(description="Only deliveries of this event (its `id`).")
        ] = None,
        limit: Limit = 20,
        cursor: Cursor = None,
    ) -> Page[Delivery]:
        before = decode_cursor(cursor)
        async with plat.database.read() as conn:
            return await store.list_deliveries(
                conn, service, state=state, event_id=event_id, limit=limit, before_id=before
            )

    return router
