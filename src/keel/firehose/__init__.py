"""The firehose: event ingestion that never loses an acknowledged event, and its Python client.

``from keel.firehose import Client, AsyncClient`` (see :mod:`keel.firehose.client`). They are
imported on first use, so that reading the service registry does not load the HTTP client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.firehose.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from keel.firehose import client

        return getattr(client, name)
    raise AttributeError(name)
