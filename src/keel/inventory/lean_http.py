"""A lean HTTP/1.1 client for the flash sale's buyers: kept-alive asyncio streams, nothing more.

httpx spent about 3 ms of CPU on each of the buyers' requests (measured); a thousand buyers on
a two-core machine then measured the client, not the server. This client writes the request
bytes itself and reads the status line, the headers and a ``Content-Length`` body, which is all
uvicorn sends to the buyers (about 0.1-0.2 ms of CPU a request).

It knows only what the buyers need: one server per :class:`Pool`, keep-alive, JSON bodies.
Whatever goes wrong on the wire (refused, reset, closed mid-reply, a reply it cannot read, no
reply in time) is raised as :class:`TransportError`, so the buyer can resend or count it.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

# Never reuse a connection idle this long: the server (uvicorn: 5 s) may be closing it, and that
# race drops the request mid-flight.
KEEPALIVE_SECONDS = 2.0
TIMEOUT_SECONDS = 60.0
# What a broken connection or an unreadable reply raises (TimeoutError is an OSError).
WIRE_ERRORS = (OSError, EOFError, ValueError, asyncio.LimitOverrunError)


class TransportError(Exception):
    """No reply was read: the request may or may not have reached the server."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One kept-alive connection; a request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()
        self.reusable = True

    @property
    def fresh(self) -> bool:
        """Open, kept alive, and not idle long enough that the server may be closing it."""
        return (
            self.reusable
            and not self.reader.at_eof()
            and time.monotonic() - self.last_used < KEEPALIVE_SECONDS
        )

    async def exchange(self, request: bytes) -> Reply:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        _version, status, *_reason = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:-2]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif status in ("204", "304"):
            body = b""
        else:  # chunked or read-until-close: uvicorn sends neither to these requests
            raise ValueError(f"a {status} reply without Content-Length")
        self.reusable = headers.get("connection", "").lower() != "close"
        self.last_used = time.monotonic()
        return Reply(int(status), headers, body)

    def close(self) -> None:
        self.writer.close()


class Pool:
    """Up to ``size`` kept-alive connections to one server, shared by any number of requests."""

    def __init__(self, base_url: str, headers: dict[str, str], size: int) -> None:
        url = urlsplit(base_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.head = f"Host: {url.netloc}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.size = size
        # Idle connections, and None for each slot with no connection open yet.
        self.idle: asyncio.Queue[Connection | None] = asyncio.Queue()
        for _ in range(size):
            self.idle.put_nowait(None)

    async def open(self) -> None:
        """Open every connection now, each proven by one ``GET /health``."""
        await asyncio.gather(*(self.request("GET", "/health") for _ in range(self.size)))

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Reply:
        """Send one request on an idle connection (opening one if none is) and read the reply."""
        request = self._request(method, path, body, headers or {})
        connection = await self.idle.get()
        try:
            if connection is None or not connection.fresh:
                if connection is not None:
                    connection.close()
                connection = await self._connect()
            async with asyncio.timeout(TIMEOUT_SECONDS):
                reply = await connection.exchange(request)
        except BaseException as exc:  # its state unknown, the connection is not reused
            if connection is not None:
                connection.close()
            self.idle.put_nowait(None)
            if isinstance(exc, WIRE_ERRORS):
                raise TransportError(f"{type(exc).__name__}: {exc}") from exc
            raise
        self.idle.put_nowait(connection)
        return reply

    def _request(self, method: str, path: str, body: Any, headers: dict[str, str]) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if body is None and method == "GET":
            return f"{method} {path} HTTP/1.1\r\n{self.head}{extra}\r\n".encode()
        data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        length = f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        return f"{method} {path} HTTP/1.1\r\n{self.head}{extra}{length}\r\n".encode() + data

    async def _connect(self) -> Connection:
        async with asyncio.timeout(TIMEOUT_SECONDS):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        return Connection(reader, writer)

    async def aclose(self) -> None:
        """Close every connection not in use."""
        while not self.idle.empty():
            connection = self.idle.get_nowait()
            if connection is not None:
                connection.close()
