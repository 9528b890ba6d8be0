"""/ready through a store outage: 200 while a spool takes the writes, 503 on the direct buffer."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from keel.firehose.app import create_app
from keel.firehose.settings import FirehoseSettings
from tests.support.cutting_proxy import CuttingProxy


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest.mark.parametrize(("buffer", "ready_in_outage"), [("spool", 200), ("direct", 503)])
async def test_ready_stays_up_while_writes_are_buffered(
    database_url: str, tmp_path: Path, buffer: str, ready_in_outage: int
) -> None:
    url = make_url(database_url)
    proxy = await CuttingProxy(url.host or "127.0.0.1", url.port or 5432).start()
    through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = FirehoseSettings(
        database_url=through, buffer=buffer, spool_path=tmp_path / "spool.db", access_log=False
    )
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        assert (await client.get("/ready")).status_code == 200
        await proxy.close()  # the store is gone
        reply = await client.get("/ready")
        assert reply.status_code == ready_in_outage, reply.text
        health = (await client.get("/health")).json()
        assert health["store"]["status"] == "down"
        assert health["buffer"]["kind"] == buffer
