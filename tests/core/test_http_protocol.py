"""keel's uvicorn protocol: one write per response, and not a byte lost or reordered for it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from keel.core.http_protocol import CoalescingHttpToolsProtocol, _CoalescingTransport
from tests.support.live_server import free_port


class RecordingTransport:
    """What reaches the socket: the real transport's side of the wrapper."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0


async def test_the_writes_of_one_loop_turn_reach_the_socket_as_one() -> None:
    real = RecordingTransport()
    wrapped = _CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    wrapped.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    wrapped.write(b"{}")
    assert real.writes == [] and wrapped.get_write_buffer_size() == 40
    await asyncio.sleep(0)  # the rest of this turn of the loop
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]


async def test_close_sends_what_is_pending_first_and_abort_drops_it() -> None:
    real = RecordingTransport()
    wrapped = _CoalescingTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    wrapped.write(b"last words")
    wrapped.close()
    assert real.writes == [b"last words"] and real.closed
    other = RecordingTransport()
    dropped = _CoalescingTransport(other, asyncio.get_running_loop())  # type: ignore[arg-type]
    dropped.write(b"never sent")
    dropped.abort()
    await asyncio.sleep(0)
    assert other.writes == [] and other.aborted


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = scope["path"].encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def _server() -> AsyncIterator[int]:
    port = free_port()
    config = uvicorn.Config(
        _app, port=port, http=CoalescingHttpToolsProtocol, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await task


async def test_a_real_server_answers_keep_alive_and_close_whole() -> None:
    """Two requests on one connection, then one with Connection: close, whose reply must be
    on the wire before the close (uvicorn closes right after writing the body)."""
    async with _server() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for path in ("/first", "/second"):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert await reader.readexactly(len(path)) == path.encode()
        writer.write(b"GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        rest = await asyncio.wait_for(reader.read(), 10)  # to EOF
        assert rest.startswith(b"HTTP/1.1 200 OK") and rest.endswith(b"\r\n\r\n/last"), rest
        writer.close()
