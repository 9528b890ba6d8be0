"""The buyers' lean HTTP/1.1 client against a real socket server of the test's own.

The server is a few lines of asyncio that answer as told, so each test can make it keep a
connection alive, close it, or die mid-reply, and count the connections it was given.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from keel.inventory.lean_http import Pool, TransportError


@dataclass
class Server:
    """Answers each request with ``reply(request head, body)``: raw bytes, or None to hang up."""

    reply: Callable[[bytes, bytes], bytes | None]
    connections: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while not reader.at_eof():
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                answer = self.reply(head, body)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer.lower():
                    return
        except asyncio.IncompleteReadError:
            return
        finally:
            writer.close()


def ok(body: dict[str, object], extra: str = "") -> bytes:
    data = json.dumps(body).encode()
    head = f"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n{extra}"
    return f"{head}content-length: {len(data)}\r\n\r\n".encode() + data


async def listen(server: Server) -> asyncio.Server:
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listening.sockets[0].getsockname()[1]
    return listening


async def test_requests_share_kept_alive_connections_and_read_every_reply() -> None:
    server = Server(lambda head, body: ok({"echo": json.loads(body or b"null")}))
    async with await listen(server):
        pool = Pool(f"http://127.0.0.1:{server.port}", {"Authorization": "Bearer k"}, 2)
        await pool.open()
        replies = await asyncio.gather(
            *(
                pool.request("POST", "/purchase", {"n": i}, {"Idempotency-Key": f"k{i}"})
                for i in range(20)
            )
        )
        await pool.aclose()
    assert [r.json()["echo"] for r in replies] == [{"n": i} for i in range(20)]
    assert {r.status for r in replies} == {201}
    assert server.connections == 2  # the two opened before, kept alive for all 20
    head, _ = server.requests[-1]
    assert b"Authorization: Bearer k\r\n" in head
    assert b"Idempotency-Key: k" in head


async def test_a_204_has_no_body_and_a_body_less_post_says_content_length_0() -> None:
    server = Server(lambda head, body: b"HTTP/1.1 204 No Content\r\n\r\n")
    async with await listen(server):
        pool = Pool(f"http://127.0.0.1:{server.port}", {}, 1)
        first = await pool.request("DELETE", "/reservations/1")
        second = await pool.request("POST", "/reservations/2/confirm")
        await pool.aclose()
    assert (first.status, first.body, second.status) == (204, b"", 204)
    assert b"Content-Length: 0\r\n" in server.requests[1][0]
    assert server.connections == 1


async def test_a_connection_the_server_closes_is_not_reused() -> None:
    server = Server(lambda head, body: ok({}, "connection: close\r\n"))
    async with await listen(server):
        pool = Pool(f"http://127.0.0.1:{server.port}", {}, 1)
        for _ in range(3):
            assert (await pool.request("GET", "/health")).status == 201
        await pool.aclose()
    assert server.connections == 3


async def test_a_reply_cut_off_or_no_server_at_all_is_a_transport_error() -> None:
    server = Server(lambda head, body: None)  # hangs up without a reply
    async with await listen(server):
        pool = Pool(f"http://127.0.0.1:{server.port}", {}, 1)
        with pytest.raises(TransportError, match="IncompleteReadError"):
            await pool.request("POST", "/purchase", {"item_id": 1})
    # The server is gone: the next request opens a new connection, which is refused.
    with pytest.raises(TransportError, match="ConnectionRefusedError"):
        await pool.request("POST", "/purchase", {"item_id": 1})
