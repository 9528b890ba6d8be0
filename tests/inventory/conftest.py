"""Inventory fixtures: the app in-process on each backend, with an admin key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from keel.core.auth import Scope
from keel.inventory.app import create_app
from keel.inventory.settings import InventorySettings


@pytest.fixture
def inventory_settings(database_url: str) -> InventorySettings:
    return InventorySettings(
        database_url=database_url, rate_limit="100000/second", access_log=False
    )


@pytest.fixture
async def inventory_app(inventory_settings: InventorySettings) -> AsyncIterator[Any]:
    app = create_app(inventory_settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def shop(inventory_app: Any, make_key: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An admin-keyed client of the inventory in-process."""
    key = await make_key(Scope.ADMIN)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=inventory_app),
        base_url="http://inventory.test",
        headers={"Authorization": f"Bearer {key}"},
    ) as client:
        yield client
