"""Structured request logs, request ids and Prometheus metrics.

One log line per request, carrying its request id (taken from ``X-Request-ID`` when the client
sends a sane one). ``KEEL_LOG_FORMAT=json`` makes every line a JSON object.
Under several worker processes the CLI sets ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics``
aggregates every worker's counters.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import IO, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
access_log = logging.getLogger("keel.access")

REQUESTS = Counter(
    "keel_http_requests_total", "HTTP requests served.", ["service", "method", "route", "status"]
)
LATENCY = Histogram(
    "keel_http_request_duration_seconds",
    "Time from request start to the end of the response.",
    ["service", "method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with whatever ``extra`` fields the caller attached."""

    _RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in record.__dict__.items() if k not in self._RESERVED})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class TextFormatter(logging.Formatter):
    """keel's text lines; the date and time are formatted once a second, not once a line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, super().formatTime(record, "%Y-%m-%d %H:%M:%S")
        return f"{self._stamp},{int(record.msecs):03d}"


PIPE_BUF = 4096  # POSIX: a write to a pipe up to this size is never interleaved with another's


class LoopBatchedHandler(logging.StreamHandler[IO[str]]):
    """Writes the lines logged during one turn of the event loop together, at the end of it.

    A worker under load logs one access line per request, and one ``write`` and ``flush`` per line
    is a system call per request. Lines logged on the event loop's thread wait in a buffer until
    the loop's current turn ends (``call_soon``), then go out in writes of at most ``PIPE_BUF``
    bytes cut at line ends, so worker processes sharing one stdout pipe never interleave inside a
    line. A WARNING or worse, a line from any other thread and ``flush()`` (called at exit by
    ``logging.shutdown``) write everything at once.
    """

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:  # logging's contract: report, never raise
            self.handleError(record)
            return
        self._lines.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop's thread
            loop = None
        if loop is None or record.levelno >= logging.WARNING:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._end_of_turn)

    def _end_of_turn(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created in Handler.__init__
            self._scheduled = False
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            lines, self._lines = self._lines, []
            for chunk in _chunks(lines):
                self.stream.write(chunk)
                self.stream.flush()  # one write(2) per chunk


def _chunks(lines: list[str]) -> Iterator[str]:
    """Lines joined into pieces of at most PIPE_BUF bytes (a longer line goes out alone)."""
    piece: list[str] = []
    size = 0
    for line in lines:
        length = len(line) if line.isascii() else len(line.encode("utf-8", "replace"))
        if piece and size + length > PIPE_BUF:
            yield "".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += length
    if piece:
        yield "".join(piece)


def configure_logging(fmt: str, level: str) -> None:
    handler = LoopBatchedHandler(sys.stdout)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("alembic").setLevel(logging.WARNING)  # /ready inspects migrations often


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if 0 < len(candidate) <= 128 and candidate.isprintable():
                return str(candidate)
    return _new_request_id()


def _request_ids() -> Iterator[str]:
    """Ids unique across processes and restarts without a syscall per request: 64 random bits
    drawn once per process, then a counter."""
    prefix = secrets.token_hex(8)
    for n in itertools.count():
        yield f"{prefix}{n:016x}"


_new_request_id = _request_ids().__next__


class RequestObservation:
    """Pure ASGI middleware: request id header, one access-log line, request metrics."""

    def __init__(self, app: ASGIApp, service: str, log_requests: bool = True) -> None:
        self.app = app
        self.service = service
        self.log_requests = log_requests
        # Metric children by label values: prometheus_client's labels() takes a lock each call.
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        token = request_id_var.set(rid)
        started = time.perf_counter()
        status = 500
        rid_header = (b"x-request-id", rid.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._observe(scope, status, time.perf_counter() - started)
            request_id_var.reset(token)

    def _observe(self, scope: Scope, status: int, elapsed: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"]
        counter = self._counters.get((method, template, status))
        if counter is None:
            counter = REQUESTS.labels(self.service, method, template, str(status))
            self._counters[(method, template, status)] = counter
        histogram = self._histograms.get((method, template))
        if histogram is None:
            histogram = LATENCY.labels(self.service, method, template)
            self._histograms[(method, template)] = histogram
        counter.inc()
        histogram.observe(elapsed)
        if self.log_requests:
            access_log.info(
                "%s %s %d %.1fms",
                method,
                scope["path"],
                status,
                elapsed * 1000,
                extra={
                    "method": method,
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "service": self.service,
                },
            )


def metrics_response() -> Response:
    """Prometheus text for this process, or for every worker under multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        data = generate_latest(registry)
    else:
        data = generate_latest()
    return Response(data, media_type=CONTENT_TYPE_LATEST)
