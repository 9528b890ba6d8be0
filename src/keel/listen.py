"""Each worker process listens on a socket of its own, and the kernel spreads connections evenly.

uvicorn's workers share one listening socket, and each accepts every connection waiting when it
wakes. So whichever worker is idle at the moment a client opens its pool takes the whole pool:
`keel bench firehose` saw all 64 of wrk's connections land on one of two workers in about one
run in three, and that run served a third less, with one core idle. Long-lived keep-alive
connections (a load balancer's pool, a client library's) are served the same lopsided way.

With ``SO_REUSEPORT`` (Linux), every worker binds the same address with a socket of its own, and
the kernel hashes each new connection to one of them: an even share for every worker, whoever is
busy. The supervisor binds the address first, so that a taken port fails at once and port 0
picks one port for all; it never listens, so no connection waits on its socket. The socket it
hands uvicorn is a :class:`WorkerSocket`, which a spawned worker unpickles as a fresh listening
socket of its own bound to that address (not, as a plain socket would be, a duplicate of one
shared socket).

A worker that dies takes the connections queued on its socket with it (reset, as on any crash);
the others keep theirs, and uvicorn's supervisor starts a replacement, which binds afresh.
"""

from __future__ import annotations

import socket
import sys
from typing import Any


def spreads_connections() -> bool:
    """Whether this platform balances connections over sockets sharing a port (Linux)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


class WorkerSocket(socket.socket):
    """The supervisor's bound socket (it never listens); in each worker, a socket of its own."""

    def __reduce__(self) -> tuple[Any, ...]:
        host, port = self.getsockname()[:2]
        return bind_reuse_port, (self.family, host, port)


def claim(family: int, host: str, port: int) -> socket.socket:
    """The supervisor's socket, refused (``EADDRINUSE``) if anything listens on the port already.

    A port shared this way is open to every socket of the same user that asks for the sharing:
    without this check, a second ``keel serve`` on the same port, of the same service or another,
    would start and silently take a share of the first one's connections.
    """
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # without SO_REUSEPORT
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]  # port 0: the one the kernel picked, for every worker
    return bind_reuse_port(family, host, port)


def bind_reuse_port(family: int, host: str, port: int) -> socket.socket:
    """A socket bound to ``(host, port)`` that shares the port with every other such socket."""
    sock = WorkerSocket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
