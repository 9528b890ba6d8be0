"""A service's OpenAPI document, told whole: every problem a route can answer, and how to call it.

Clients are generated from ``/openapi.json``, so it lists what the server really does:

* every problem response as ``application/problem+json`` with the Problem schema and its ``code``s,
  per status: the route's own (declared with :func:`keel.core.errors.problem_responses`) and the
  platform's, added here from what the route is (authenticated, takes parameters or a body,
  idempotent), so a new service documents them by declaring nothing more;
* the API-key security schemes, with the scope each operation needs;
* the ``Idempotency-Key`` header on the operations that honour it (:data:`IDEMPOTENT`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts

from keel.core.errors import (
    PROBLEM_SCHEMA,
    Forbidden,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    InvalidJson,
    InvalidRequest,
    KeelError,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    documented_codes,
    error_classes,
    problem_responses,
    unavailable_errors,
)

SCOPE_ATTRIBUTE = "keel_scope"  # set by keel.core.app.require on its dependency
IDEMPOTENCY_KEY_PARAMETER: dict[str, Any] = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": (
        "Makes a retry safe: the same key with the same body replays the first response "
        "(`Idempotent-Replayed: true`); with another body it is 422 `idempotency_key_reused`. "
        "1 to 255 printable ASCII characters, kept 24 hours."
    ),
    # Printable ASCII with no space at either end: HTTP strips those, so they cannot be sent.
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "pattern": "^[\\x21-\\x7e]([\\x20-\\x7e]*[\\x21-\\x7e])?$",
    },
}
# ``openapi_extra`` of a route that honours Idempotency-Key.
IDEMPOTENT: dict[str, Any] = {"parameters": [IDEMPOTENCY_KEY_PARAMETER]}
SECURITY_SCHEMES: dict[str, Any] = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from `keel apikey create`, as `Authorization: Bearer <key>`.",
    },
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json`` and ``/docs``) the whole document."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # FastAPI's, cached on the app; completing it twice changes nothing
        for route in iter_route_contexts(app.routes):
            if isinstance(route.original_route, APIRoute) and route.include_in_schema:
                for method in route.methods or ():
                    operation = schema["paths"][route.path_format].get(method.lower())
                    if operation is not None:
                        document_operation(operation, route)
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
        components["securitySchemes"] = SECURITY_SCHEMES
        _drop_unused_framework_schemas(schema)
        _whole_bounds_as_integers(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def document_operation(operation: dict[str, Any], route: Any) -> None:
    """Merge the platform's problems into the operation's declared ones; add its security.

    FastAPI's own 422 entry (``HTTPValidationError``, which keel never sends) is replaced by the
    ``validation_error`` problem.
    """
    responses: dict[str, Any] = operation.setdefault("responses", {})
    classes = error_classes()
    declared = [code for entry in responses.values() for code in documented_codes(entry)]
    errors = [classes[code] for code in declared if code in classes]
    errors += platform_errors(route)
    for status, entry in problem_responses(*dict.fromkeys(errors)).items():
        responses[str(status)] = entry
    scope = route_scope(route)
    if scope is not None:
        operation["security"] = [{name: [scope]} for name in SECURITY_SCHEMES]
    for parameter in operation.get("parameters", []):
        _not_nullable(parameter)


def _not_nullable(parameter: dict[str, Any]) -> None:
    """An optional parameter is one that may be absent: a query string cannot carry a null.

    FastAPI writes ``X | None = None`` as ``anyOf: [X, {type: null}]``; that admits a value no
    client can send, and lets a fuzzer's "invalid" value serialise to nothing at all.
    """
    schema = parameter.get("schema", {})
    choices = [c for c in schema.get("anyOf", []) if c != {"type": "null"}]
    if "anyOf" in schema and len(choices) == 1:
        del schema["anyOf"]
        schema.update(choices[0])


def platform_errors(route: Any) -> list[type[KeelError]]:
    """The problems the platform itself can answer on this route, whatever the service does."""
    errors: list[type[KeelError]] = [PayloadTooLarge, KeelError]  # body limit; the unexpected
    parts = list(_dependants(route.dependant))
    body = any(part.body_params for part in parts)
    params = any(
        part.path_params or part.query_params or part.header_params or part.cookie_params
        for part in parts
    )
    if params or body:
        errors.append(InvalidRequest)
    if body:
        errors.append(InvalidJson)
    if route_scope(route) is not None:
        errors += [Unauthorized, Forbidden, RateLimited, *unavailable_errors()]
    if IDEMPOTENCY_KEY_PARAMETER in (route.openapi_extra or {}).get("parameters", []):
        errors += [InvalidIdempotencyKey, IdempotencyKeyInUse, IdempotencyKeyReused]
    return errors


def route_scope(route: Any) -> str | None:
    """The API-key scope the route requires, or None if it is open."""
    for part in _dependants(route.dependant):
        scope = getattr(part.call, SCOPE_ATTRIBUTE, None)
        if scope is not None:
            return str(scope.value)
    return None


def _dependants(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _dependants(sub)


def _drop_unused_framework_schemas(schema: dict[str, Any]) -> None:
    """FastAPI's own 422 schemas, once no operation refers to them (keel's 422 is a Problem)."""
    if "#/components/schemas/HTTPValidationError" not in json.dumps(schema.get("paths", {})):
        for name in ("HTTPValidationError", "ValidationError"):
            schema["components"]["schemas"].pop(name, None)


_BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}


def _whole_bounds_as_integers(node: Any) -> None:
    """``1`` rather than FastAPI's ``1.0`` for integer bounds, as the models declare them."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _BOUNDS and isinstance(value, float) and value.is_integer():
                node[key] = int(value)
            else:
                _whole_bounds_as_integers(value)
    elif isinstance(node, list):
        for item in node:
            _whole_bounds_as_integers(item)
