"""``keel serve --workers N``: every worker listens on a socket of its own (keel.listen)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest

from keel.listen import (
    WorkerSocket,
    bind_reuse_port,
    claimed,
    port_lock_path,
    spreads_connections,
)
from keel.serving import keel_command
from tests.support.live_server import LiveServer, free_port

pytestmark = pytest.mark.skipif(not spreads_connections(), reason="SO_REUSEPORT balancing: Linux")

CONNECTIONS = 64


async def _open_all_then_ask(port: int) -> None:
    """A client's pool: every connection opened first, then one request on each, kept alive."""
    pool = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS)]
    request = b"GET /health HTTP/1.1\r\nHost: keel\r\n\r\n"
    for _reader, writer in pool:
        writer.write(request)
    for reader, _writer in pool:
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
    for _reader, writer in pool:
        writer.close()


def test_a_pool_of_connections_is_shared_by_every_worker(tmp_path: Path) -> None:
    """Opened at once, a client's connections land on both workers, not all on whichever
    woke first (with one shared socket, a waking worker accepted every connection waiting)."""
    url = f"sqlite:///{tmp_path / 'firehose.db'}"  # keel serve migrates it
    with LiveServer(url, tmp_path, workers=2, service="firehose").start() as server:
        for _ in range(3):  # three pools, each checked on its own
            before = server.requests_served("GET", "/health")
            asyncio.run(_open_all_then_ask(server.port))
            shares = server.wait_requests_served("GET", "/health", before, CONNECTIONS)
            assert len(shares) == 2 and min(shares.values()) >= CONNECTIONS // 4, shares


def test_a_worker_unpickles_a_socket_of_its_own() -> None:
    supervisor = bind_reuse_port(socket.AF_INET, "127.0.0.1", 0)
    with supervisor:
        port = supervisor.getsockname()[1]
        # What a spawned worker receives: multiprocessing pickles a plain socket as a duplicate
        # of the same one, so this must be the subclass's own reduction.
        worker = pickle.loads(ForkingPickler.dumps(supervisor))
        with worker:
            assert isinstance(worker, WorkerSocket)
            assert os.fstat(worker.fileno()).st_ino != os.fstat(supervisor.fileno()).st_ino
            assert worker.getsockname() == ("127.0.0.1", port)
            worker.listen()
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                accepted, _ = worker.accept()  # the worker's socket gets the connection
                accepted.close()


def test_a_worker_that_cannot_listen_stops_the_server_instead_of_respawning() -> None:
    """uvicorn's supervisor respawns a worker that dies, but stops on exit status 3: a worker
    that cannot bind its socket (the port taken meanwhile) must say so and exit 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = f"from keel.listen import _worker_socket; _worker_socket(2, '127.0.0.1', {port})"
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
    assert done.returncode == 3, done.stderr
    assert "cannot listen" in done.stderr and "in use" in done.stderr


def test_a_port_taken_before_the_workers_listen_stops_keel_serve_with_status_3(
    tmp_path: Path,
) -> None:
    """The supervisor's socket does not listen: in the moment before its workers do, another
    listener may take the port. Its workers then cannot bind; uvicorn stops instead of
    respawning them, and keel serve must exit 3 (a failed start), not 0."""
    port = free_port()
    lock = port_lock_path(port)
    lock.unlink(missing_ok=True)
    serve = _start_serve(port, tmp_path)
    try:
        while not lock.exists():  # made once the supervisor's socket is bound
            assert serve.poll() is None, "keel serve exited before binding"
            time.sleep(0.001)  # a polled condition: the window after it lasts ~0.1 s
        with socket.socket() as taker:
            taker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            taker.bind(("127.0.0.1", port))
            taker.listen()
            output, status = _finish(serve)
    finally:
        _kill(serve)
    assert status == 3, output
    assert b"cannot listen" in output


def test_a_port_another_keel_serve_is_starting_on_is_refused(tmp_path: Path) -> None:
    """Until its workers listen, seconds after it starts, a keel serve's port looks free: a
    second one started then must still be refused, not share the port with it."""
    port = free_port()
    with claimed(socket.AF_INET, "127.0.0.1", port):  # a supervisor whose workers are starting
        output, status = _serve(port, tmp_path)
    assert status == 1, output
    assert b"address already in use" in output.lower()


@pytest.mark.parametrize("sharing", [False, True], ids=["plain", "port-sharing"])
def test_a_port_in_use_is_refused_even_to_a_socket_that_would_share_it(
    tmp_path: Path, sharing: bool
) -> None:
    """Another listener on the port, even one asking to share it (a second keel serve), makes
    keel serve fail at once: it must never quietly split a port's connections with a stranger."""
    taken = bind_reuse_port(socket.AF_INET, "127.0.0.1", 0) if sharing else socket.socket()
    with taken:
        if not sharing:
            taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        output, status = _serve(port, tmp_path)
    assert status == 1, output
    assert b"address already in use" in output.lower()


def _serve(port: int, tmp_path: Path) -> tuple[bytes, int | None]:
    """``keel serve firehose --workers 2`` on ``port``: its output and exit status, or, if it
    started serving after all, killed (with its workers) after a minute."""
    serve = _start_serve(port, tmp_path)
    try:
        return _finish(serve)
    finally:
        _kill(serve)


def _start_serve(port: int, tmp_path: Path) -> subprocess.Popen[bytes]:
    command = [*keel_command(), "serve", "firehose", "--workers", "2", "--port", str(port)]
    command += ["--database-url", f"sqlite:///{tmp_path / 'firehose.db'}"]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def _finish(serve: subprocess.Popen[bytes]) -> tuple[bytes, int | None]:
    try:
        output, _ = serve.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        return b"still serving after 60 s", None
    return output, serve.returncode


def _kill(serve: subprocess.Popen[bytes]) -> None:
    """The server and its workers, if anything is left of them."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(serve.pid, signal.SIGKILL)
    serve.wait()
