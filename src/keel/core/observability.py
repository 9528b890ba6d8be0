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
import re
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
from starlette.types import Scope

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

    def line(
        self, created: float, logger: str, rid: str, message: str, fields: dict[str, Any]
    ) -> str:
        """What :meth:`format` makes of an INFO record with these ``extra`` fields."""
        line: dict[str, Any] = {"ts": round(created, 6), "level": "info", "logger": logger}
        line["msg"] = message
        line.update(fields)
        line["request_id"] = rid
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

    def line(
        self, created: float, logger: str, rid: str, message: str, _fields: dict[str, Any]
    ) -> str:
        """What :meth:`format` makes of an INFO record logged at ``created``."""
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(created))
        msecs = int((created - second) * 1000)
        return f"{self._stamp},{msecs:03d} INFO {logger} [{rid}] {message}"


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
            line = self.format(record)
        except Exception:  # logging's contract: report, never raise
            self.handleError(record)
            return
        self.add_line(line, record.levelno)

    def add_line(self, line: str, levelno: int = logging.INFO) -> None:
        """Queue one formatted line (the access log's way in, past the LogRecord)."""
        self._lines.append(line + self.terminator)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop's thread
            loop = None
        if loop is None or levelno >= logging.WARNING:
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


_sink: LoopBatchedHandler | None = None


def _direct_sink() -> LoopBatchedHandler | None:
    """keel's handler, if it alone receives ``keel.access`` lines, formatted the keel way."""
    root = logging.root.handlers
    if (
        _sink is not None
        and len(root) == 1
        and root[0] is _sink
        and not access_log.handlers
        and not access_log.filters
        and access_log.propagate
        and type(_sink.formatter) in (TextFormatter, JsonFormatter)
    ):
        return _sink
    return None


def configure_logging(fmt: str, level: str) -> None:
    global _sink
    handler = LoopBatchedHandler(sys.stdout)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    _sink = handler
    root.setLevel(level.upper())
    logging.getLogger("alembic").setLevel(logging.WARNING)  # /ready inspects migrations often


# What request ids are made of (UUIDs, hex, base64, dotted trace ids): no space, quote, bracket
# or backslash, so a client's id cannot end a text line's ``[request id]`` field and forge the rest.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")


def request_id_from(value: bytes) -> str:
    """The client's ``X-Request-ID`` when it is a sane one, else a new id."""
    if _REQUEST_ID.fullmatch(value):
        return value.decode("ascii")
    return new_request_id()


def _request_ids() -> Iterator[str]:
    """Ids unique across processes and restarts without a syscall per request: 64 random bits
    drawn once per process, then a counter."""
    prefix = secrets.token_hex(8)
    for n in itertools.count():
        yield f"{prefix}{n:016x}"


new_request_id = _request_ids().__next__

# C0 and C1 control characters, DEL: a decoded path may carry them (%0A, %1B) and a log line must
# stay one line that cannot move a terminal's cursor.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    """``text`` with control characters escaped as ``\\xNN``, other unprintable ones as ``\\uNNNN``.

    The others include U+2028 and U+2029, which many log readers take for line ends.
    """
    if text.isprintable():
        return text
    text = text.translate(_CONTROL)
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})


class AccessLog:
    """One access line and the request metrics for every request, at a cost that fits.

    With keel's own logging set up (:func:`configure_logging`), the line is formatted here
    directly, the same text the logging machinery would produce, without building a LogRecord.
    Otherwise (a test's or an embedding application's handlers) it goes through ``logging``.

    Sampling (``log_every`` of a route, default 1 = every request): a route sampled 1 in N logs
    one in N of its successful requests (status < 400) faster than ``slow_seconds``; every error
    and every slow request is always logged. Metrics always count every request.
    """

    def __init__(self, service: str, enabled: bool = True, slow_seconds: float = 0.5) -> None:
        self.service = service
        self.enabled = enabled
        self.slow_seconds = slow_seconds
        self.log_every: dict[tuple[str, str], int] = {}  # (method, route template) -> N
        self._seen: dict[tuple[str, str], int] = {}
        # Metric children by label values: prometheus_client's labels() takes a lock each call.
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    def record(self, scope: Scope, status: int, elapsed: float, rid: str) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"]
        # Any token is a method to HTTP (h11 serves them all): the rest share one label set.
        self._count(method if method in _METHODS else "OTHER", template, status, elapsed)
        if self.enabled and self._sampled(method, template, status, elapsed):
            self._write(method, printable(scope["path"]), status, elapsed, rid)

    def _count(self, method: str, template: str, status: int, elapsed: float) -> None:
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

    def _sampled(self, method: str, template: str, status: int, elapsed: float) -> bool:
        every = self.log_every.get((method, template), 1) if self.log_every else 1
        if every <= 1 or status >= 400 or elapsed >= self.slow_seconds:
            return True
        seen = self._seen.get((method, template), 0)
        self._seen[(method, template)] = seen + 1
        return seen % every == 0

    def _write(self, method: str, path: str, status: int, elapsed: float, rid: str) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        message = f"{method} {path} {status} {elapsed * 1000:.1f}ms"
        fields = {
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
            "service": self.service,
        }
        sink = _direct_sink()
        if sink is None:
            access_log.info(message, extra=fields)
            return
        formatter = sink.formatter
        assert isinstance(formatter, TextFormatter | JsonFormatter)  # _direct_sink checked it
        sink.add_line(formatter.line(time.time(), "keel.access", rid, message, fields))


def metrics_response() -> Response:
    """Prometheus text for this process, or for every worker under multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        data = generate_latest(registry)
    else:
        data = generate_latest()
    return Response(data, media_type=CONTENT_TYPE_LATEST)
