"""Each worker process listens on a socket of its own, and the kernel spreads connections evenly.

uvicorn's workers share one listening socket, and each accepts every connection waiting when it
wakes. So whichever worker is idle at the moment a client opens its pool takes the whole pool:
`keel bench firehose` saw all 64 of wrk's connections land on one of two workers in about one
run in three, and that run served a third less, with one core idle. Long-lived keep-alive
connections (a load balancer's pool, a client library's) are served the same lopsided way.

With ``SO_REUSEPORT`` (Linux), every worker binds the same address with a socket of its own, and
the kernel hashes each new connection to one of them: an even share for every worker. The
supervisor claims the port first (:func:`claimed`) and binds a socket it never listens on. The
socket it hands uvicorn is a :class:`WorkerSocket`, which a spawned worker unpickles as a fresh
socket of its own bound to that address (not, as a plain socket would be, a duplicate of one
shared socket).

What it costs, and why ``keel serve --no-reuse-port`` keeps the shared socket:

- A worker that exits (a crash, a kill, uvicorn's restart on ``SIGHUP``) resets the connections
  still queued on its socket, unless ``net.ipv4.tcp_migrate_req=1`` (Linux 5.14+) moves them to
  the others. With one shared socket, another worker would have accepted them.
- A worker busy on a long step (a SQLite commit runs on its loop) still gets its share of new
  connections, which wait for it; with a shared socket an idle worker would take them.
- The kernel lets any socket of the same user join the port while keel serves it, and take a
  share of its connections. Other users cannot. keel refuses a port that is taken when it
  starts, but cannot keep a process of its own user out later: run it under a user of its own.
- The supervisor's socket never listens, so it does not hold the port while no worker listens
  (in the moment before the first one does, or if every worker dies at once): a listener of any
  user may take the port then. keel's workers then cannot bind, exit 3, and ``keel serve`` stops
  with status 3 rather than share the port or respawn them forever.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from uvicorn.config import STARTUP_FAILURE  # a worker exiting with it stops the supervisor


def spreads_connections() -> bool:
    """Whether this platform balances connections over sockets sharing a port (Linux)."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        return False
    with socket.socket() as sock:
        try:  # refused in some sandboxes and old kernels (ENOPROTOOPT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        except OSError:
            return False
    return True


class WorkerSocket(socket.socket):
    """The supervisor's bound socket (it never listens); in each worker, a socket of its own."""

    def __reduce__(self) -> tuple[Any, ...]:
        host, port = self.getsockname()[:2]
        return _worker_socket, (self.family, host, port)


@contextmanager
def claimed(family: int, host: str, port: int) -> Iterator[socket.socket]:
    """The supervisor's socket for ``(host, port)``, held until the block ends; ``OSError``
    (``EADDRINUSE``) if another multi-worker ``keel serve`` of this user holds the port, or
    anything listens on it.

    Workers listen only once they have started. Until then the port looks free to the kernel, so
    keel servers of one user take turns through a lock file per port, in a directory only that
    user may write (other users cannot join the port anyway: the kernel lets only sockets of
    the same user share it).
    """
    with ExitStack() as stack:
        if port:
            with socket.socket(family, socket.SOCK_STREAM) as probe:  # not sharing: any
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # listener refuses
                probe.bind((host, port))
        sock = stack.enter_context(bind_reuse_port(family, host, port))
        stack.enter_context(_port_lock(sock.getsockname()[1]))  # port 0: the port it was given
        yield sock


def port_lock_path(port: int) -> Path:
    """The lock file of ``port``: in the user's runtime directory, or a private one in /tmp."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    directory = Path(runtime, "keel-ports") if runtime else Path(tempfile.gettempdir())
    if not runtime:
        directory /= f"keel-ports-{os.getuid()}"
    return directory / f"{port}.lock"


@contextmanager
def _port_lock(port: int) -> Iterator[None]:
    path = port_lock_path(port)
    directory = path.parent
    directory.mkdir(mode=0o700, exist_ok=True)
    found = directory.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise OSError(errno.EPERM, f"{directory} is not a private directory of this user")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel frees it when keel exits
    except BlockingIOError:
        os.close(fd)
        message = f"Address already in use (another keel serve holds port {port})"
        raise OSError(errno.EADDRINUSE, message) from None
    try:
        yield
    finally:
        os.close(fd)


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
    return sock


def _worker_socket(family: int, host: str, port: int) -> socket.socket:
    """What a worker unpickles: its own socket, or an exit that stops the supervisor (a worker
    that cannot bind would fail the same way on every restart)."""
    try:
        return bind_reuse_port(family, host, port)
    except OSError as exc:
        print(f"keel worker: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
