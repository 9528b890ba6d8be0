"""Domain errors and their one rendering: RFC 9457 ``application/problem+json``.

Hierarchy::

    KeelError                      (500 internal_error)
    ├── BadRequest                 (400 bad_request)
    │   ├── InvalidJson            (400 invalid_json)
    │   ├── InvalidCursor          (400 invalid_cursor)
    │   └── InvalidIdempotencyKey  (400 invalid_idempotency_key)
    ├── Unauthorized               (401 unauthorized)
    ├── Forbidden                  (403 forbidden)
    ├── NotFound                   (404 not_found)
    ├── Conflict                   (409 conflict)
    │   └── IdempotencyKeyInUse    (409 idempotency_key_in_use)
    ├── PayloadTooLarge            (413 payload_too_large)
    ├── InvalidRequest             (422 validation_error: the request breaks its schema)
    ├── UnprocessableEntity        (422 unprocessable: well formed, refused by a rule)
    │   └── IdempotencyKeyReused   (422 idempotency_key_reused)
    ├── RateLimited                (429 rate_limited, Retry-After)
    ├── NotReady                   (503 not_ready, GET /ready only)
    ├── OutcomeUnknown             (502 outcome_unknown, no Retry-After)
    └── ServiceUnavailable         (503 service_unavailable, Retry-After)
        ├── DatabaseUnavailable    (503 database_unavailable: nothing was written)
        └── Overloaded             (503 overloaded: the write queue is full)

Services subclass these with their own ``code`` (``insufficient_funds``, ``sold_out``, …).
Routes raise; :func:`install_error_handlers` renders. No route builds error JSON by hand.
:func:`problem_responses` documents a route's errors in its OpenAPI, from the same classes.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any, ClassVar

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    NotSupportedError,
    ProgrammingError,
    SQLAlchemyError,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("keel.errors")


class KeelError(Exception):
    """Base of every error keel reports to a client."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal server error"

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None) -> None:
        self.detail = detail or self.title
        self.headers = headers or {}
        super().__init__(self.detail)


class BadRequest(KeelError):
    status, code, title = 400, "bad_request", "Bad request"


class InvalidJson(BadRequest):
    code, title = "invalid_json", "Malformed JSON"


class InvalidCursor(BadRequest):
    code, title = "invalid_cursor", "Invalid pagination cursor"


class InvalidIdempotencyKey(BadRequest):
    code, title = "invalid_idempotency_key", "Invalid Idempotency-Key header"


class Unauthorized(KeelError):
    status, code, title = 401, "unauthorized", "Missing or invalid API key"


class Forbidden(KeelError):
    status, code, title = 403, "forbidden", "API key lacks the required scope"


class NotFound(KeelError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(KeelError):
    status, code, title = 409, "conflict", "Conflict"


class IdempotencyKeyInUse(Conflict):
    code, title = "idempotency_key_in_use", "A request with this Idempotency-Key is in flight"


class PayloadTooLarge(KeelError):
    status, code, title = 413, "payload_too_large", "Request body too large"


class InvalidRequest(KeelError):
    status, code, title = 422, "validation_error", "Invalid request"


class UnprocessableEntity(KeelError):
    status, code, title = 422, "unprocessable", "Unprocessable request"


class IdempotencyKeyReused(UnprocessableEntity):
    code, title = "idempotency_key_reused", "Idempotency-Key was used with a different request"


class RateLimited(KeelError):
    status, code, title = 429, "rate_limited", "Rate limit exceeded"


class NotReady(KeelError):
    status, code, title = 503, "not_ready", "Not ready"


class ServiceUnavailable(KeelError):
    status, code, title = 503, "service_unavailable", "Service unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    code, title = "database_unavailable", "Database unavailable"


class Overloaded(ServiceUnavailable):
    code, title = "overloaded", "Too many writes queued"


class OutcomeUnknown(KeelError):
    """The connection failed while COMMIT was in flight: the write may or may not have happened.

    502, not 503: a 503 (and a ``Retry-After``) tells generic clients and proxies that the
    request was not acted on and may simply be sent again, which here could post money twice.
    502 says what happened: the upstream (the database) gave no valid answer.
    """

    status, code, title = 502, "outcome_unknown", "Outcome unknown"

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or OUTCOME_UNKNOWN_DETAIL, headers=headers)


OUTCOME_UNKNOWN_DETAIL = (
    "The database connection failed while the write was being committed, so it may or may not "
    "have been applied. Retry only with the same Idempotency-Key (a replay then answers with the "
    "first outcome); without one, read the current state before sending it again."
)


PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An RFC 9457 problem document: what every error response carries.",
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string", "description": "A URI naming the problem type."},
        "title": {"type": "string", "description": "A short summary of the problem type."},
        "status": {"type": "integer", "description": "The HTTP status code."},
        "detail": {"type": "string", "description": "What went wrong with this request."},
        "code": {"type": "string", "description": "A stable snake_case code to branch on."},
        "errors": {
            "type": "array",
            "description": "For `validation_error` and `invalid_json`: each broken rule.",
            "items": {
                "type": "object",
                "required": ["loc", "msg"],
                "properties": {
                    "loc": {"type": "array", "items": {"type": "string"}},
                    "msg": {"type": "string"},
                },
            },
        },
    },
}
PROBLEM_REF = "#/components/schemas/Problem"


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """Render one problem document."""
    body: dict[str, Any] = {
        "type": f"https://keel.dev/problems/{code.replace('_', '-')}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def invalid_request(errors: list[dict[str, Any]]) -> Response:
    """422 ``validation_error`` with ``errors: [{loc, msg}]``, as every validation failure reads."""
    kind = InvalidRequest
    return problem_response(
        kind.status, kind.code, kind.title, "The request failed validation.", errors=errors
    )


def render(error: KeelError) -> Response:
    return problem_response(
        error.status, error.code, error.title, error.detail, headers=error.headers
    )


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": [str(part) for part in err.get("loc", ())], "msg": str(err.get("msg", ""))}
        for err in exc.errors()
    ]


_HTTP_CODES = {
    400: (InvalidJson.code, InvalidJson.title),  # FastAPI's "error parsing the body"
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    413: ("payload_too_large", "Request body too large"),
}
# Everything the database layer raises: SQLAlchemy's wrappers, the drivers' own errors (hot paths
# call asyncpg and sqlite3 directly) and the socket's. Whatever reaches the renderer unwrapped was
# raised before COMMIT was sent (see keel.core.database), so nothing was written: 503, retry.
DATABASE_ERRORS = (
    SQLAlchemyError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    sqlite3.Error,
    OSError,
)
# SQLSTATE classes that mean the connection or the server failed, not that it refused the work.
_CONNECTION_FAILURE_CLASSES = frozenset({"08", "53", "57", "58", "XX"})  # 53: out of resources
# The transaction was rolled back so that another could proceed: running it again is safe.
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock, serialization failure


def sqlstate_of(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE behind ``exc``, raw from asyncpg or wrapped by SQLAlchemy."""
    current: BaseException | None = exc
    for _ in range(4):  # the wrappers nest two or three deep
        if current is None or isinstance(current, KeelError):
            return None
        state = getattr(current, "sqlstate", None)
        if isinstance(state, str):
            return state
        current = getattr(current, "orig", None) or current.__cause__
    return None


def commit_failure(exc: Exception) -> Exception:
    """What an error raised by COMMIT means for the client.

    A refusal the server sent (a serialization failure, a deferred constraint) means it rolled
    back: the error stands. Anything else (the connection lost, the server shutting down) leaves
    the outcome unknown.
    """
    if isinstance(exc, KeelError):
        return exc
    state = sqlstate_of(exc)
    if state is not None and state[:2] not in _CONNECTION_FAILURE_CLASSES:
        return exc
    return OutcomeUnknown()


def _database_problem(exc: Exception) -> Response:
    """503 + ``Retry-After``: the error came before COMMIT was sent, so nothing was written."""
    state = sqlstate_of(exc)
    if state in RETRYABLE_SQLSTATES:
        detail = "The write conflicted with another and was rolled back; retry."
        log.warning("write conflict: %s", type(exc).__name__)
    elif _is_refusal(exc, state):  # a statement the database refused: a bug, still never a 500
        detail = "The database refused the request; nothing was written."
        log.error("database error", exc_info=exc)
    else:
        detail = "The database is unavailable; nothing was written; retry."
        log.warning("database unavailable: %s", exc)
    return render(DatabaseUnavailable(detail, headers={"Retry-After": "1"}))


def _is_refusal(exc: Exception, state: str | None) -> bool:
    """True when the database refused the statement itself, rather than failing to run it."""
    if state is not None:
        return state[:2] not in _CONNECTION_FAILURE_CLASSES
    if isinstance(exc, DBAPIError):
        return isinstance(exc, _REFUSED)
    return isinstance(exc, (SQLAlchemyError, *_SQLITE_REFUSED))


_REFUSED = (IntegrityError, ProgrammingError, DataError, NotSupportedError)
_SQLITE_REFUSED = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.DataError)


def render_exception(exc: Exception) -> Response:
    """The one place an exception becomes a response (FastAPI handlers and fast routes alike)."""
    if isinstance(exc, KeelError):
        return render(exc)
    if isinstance(exc, RequestValidationError):
        return _validation_problem(exc)
    if isinstance(exc, StarletteHTTPException):
        code, title = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error"))
        return problem_response(
            exc.status_code, code, title, str(exc.detail), headers=dict(exc.headers or {})
        )
    if isinstance(exc, DATABASE_ERRORS):
        return _database_problem(exc)
    log.error("unhandled error", exc_info=exc)
    return problem_response(500, "internal_error", "Internal server error", "Unexpected error.")


def _validation_problem(exc: RequestValidationError) -> Response:
    errors = _validation_errors(exc)
    if any(err.get("type") == "json_invalid" for err in exc.errors()):
        kind = InvalidJson
        return problem_response(
            kind.status, kind.code, kind.title, "The request body is not valid JSON.", errors=errors
        )
    return invalid_request(errors)


async def _handle(_request: Request, exc: Exception) -> Response:
    return render_exception(exc)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error, ours or the framework's, through the problem renderer."""
    for kind in (
        KeelError,
        RequestValidationError,
        StarletteHTTPException,
        *DATABASE_ERRORS,
        Exception,
    ):
        app.add_exception_handler(kind, _handle)


def problem_responses(*errors: type[KeelError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the problems a route can return, grouped by status.

    Each status documents ``application/problem+json`` with the Problem schema, its ``code`` as an
    enum of the listed classes' codes, and each code's title in the description. The platform's
    own problems (auth, limits, validation, outages) are added to every route by
    :mod:`keel.core.openapi`; a route lists only its own.
    """
    by_status: dict[int, dict[str, str]] = {}
    for err in errors:
        by_status.setdefault(err.status, {})[err.code] = err.title
    return {status: _problem_entry(status, codes) for status, codes in sorted(by_status.items())}


def _problem_entry(status: int, codes: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "description": "\n".join(f"- `{code}`: {title}" for code, title in codes.items()),
        "content": {
            PROBLEM_JSON: {
                "schema": {
                    "allOf": [{"$ref": PROBLEM_REF}],
                    "properties": {
                        "status": {"const": status},
                        "code": {"enum": list(codes)},
                    },
                }
            }
        },
    }
    if status in (429, 503):
        entry["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying, when a retry is safe.",
                "schema": {"type": "integer", "minimum": 0},
            }
        }
    return entry


def documented_codes(entry: dict[str, Any]) -> list[str]:
    """The problem codes a ``responses`` entry made by :func:`problem_responses` lists."""
    try:
        schema = entry["content"][PROBLEM_JSON]["schema"]
        return list(schema["properties"]["code"]["enum"])
    except (KeyError, TypeError):
        return []


def error_classes() -> dict[str, type[KeelError]]:
    """Every error class defined so far, by code (a code reused by a subclass keeps the first)."""
    found: dict[str, type[KeelError]] = {}
    pending: list[type[KeelError]] = [KeelError]
    while pending:
        cls = pending.pop(0)
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


def unavailable_errors() -> list[type[KeelError]]:
    """The outages any route that reaches the database or a write queue can answer.

    Derived from the classes: a core subclass of :class:`ServiceUnavailable` (or of
    :class:`OutcomeUnknown`) is documented on every such route as soon as it is defined.
    """
    pending: list[type[KeelError]] = [ServiceUnavailable, OutcomeUnknown]
    found = []
    while pending:
        cls = pending.pop(0)
        if cls.__module__ == __name__:
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return found
