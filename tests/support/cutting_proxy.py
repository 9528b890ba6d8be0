"""A TCP proxy in front of PostgreSQL that cuts a connection at a chosen point of the protocol.

Lets a test lose the database connection exactly before, or exactly during, a COMMIT without
touching the server: the proxy watches what the client sends and, once it has seen ``marker``,
either drops the connection without forwarding it (``forward=False``: the server never sees that
message, so the transaction rolls back) or forwards it and drops the server's answer
(``forward=True``: the server acts on it, the client never hears).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class CuttingProxy:
    """Forwards 127.0.0.1:<port> to ``target``; :meth:`arm` chooses where the next cut falls."""

    target_host: str
    target_port: int
    port: int = 0
    marker: bytes | None = None
    forward: bool = False
    cuts: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def arm(self, marker: bytes, *, forward: bool) -> None:
        """Cut the next connection whose client sends ``marker``."""
        self.marker, self.forward = marker, forward

    async def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.target_host, self.target_port)
        self._writers += [client_w, server_w]
        cut = asyncio.Event()

        def sever() -> None:
            cut.set()
            self.cuts += 1
            self.marker = None
            for writer in (client_w, server_w):
                writer.transport.abort()  # a reset, as when a server dies

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self.marker is not None and self.marker in data:
                    if self.forward:
                        self.marker = None
                        server_w.write(data)
                        await server_w.drain()
                        cut.set()  # the answer, when it comes, is dropped
                        return
                    sever()
                    return
                server_w.write(data)
                await server_w.drain()
            server_w.close()  # the client hung up: so does the server's side

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if cut.is_set():
                    sever()
                    return
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        with contextlib.suppress(OSError, ConnectionError):
            await asyncio.gather(upstream(), downstream())
        for writer in (client_w, server_w):
            writer.close()


@dataclass
class StallingProxy(CuttingProxy):
    """A proxy that can go silent, as a dropped network link does.

    :meth:`stall` swallows every byte on the connections open then (and on any opened meanwhile)
    without closing them: a client waits for an answer that never comes. :meth:`heal` lets new
    connections through again; the stalled ones stay lost, as connections across a partition do.
    """

    stalled: bool = False
    swallowed: int = 0  # chunks a client sent into the silence
    _lost: list[dict[str, bool]] = field(default_factory=list)

    def stall(self) -> None:
        self.stalled = True
        for link in self._lost:
            link["lost"] = True

    def heal(self) -> None:
        self.stalled = False

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self.target_host, self.target_port)
        self._writers += [client_w, server_w]
        link = {"lost": self.stalled}
        self._lost.append(link)

        async def pipe(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
        ) -> None:
            while data := await reader.read(65536):
                if link["lost"]:
                    self.swallowed += upstream
                    continue
                writer.write(data)
                await writer.drain()
            writer.close()

        with contextlib.suppress(OSError, ConnectionError):
            await asyncio.gather(pipe(client_r, server_w, True), pipe(server_r, client_w, False))
