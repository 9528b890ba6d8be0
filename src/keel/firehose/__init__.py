"""firehose: event ingestion that never loses an acknowledged event, and its Python client."""

from keel.firehose.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]
