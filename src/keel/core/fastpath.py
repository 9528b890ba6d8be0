"""Hot routes served without FastAPI's per-request machinery, from FastAPI's own declaration.

A service declares a route once, as a plain FastAPI route, and names it in
``ServiceSpec.fast_routes``. At start-up :func:`compile_fast_routes` reads what FastAPI made of
that route (its path and body parameters, its ``require(scope)`` and ``platform`` dependencies)
and :class:`FastPath` then serves the route by calling the same endpoint function with the same
validation: FastAPI's own body and parameter validators, the same JSON and content-type rules, the
same auth and rate-limit call, the same error rendering. What it skips is FastAPI's routing table,
its dependency solver and its middleware stack, which cost several times what a no-op route does.
So one schema, one handler and one auth path serve both ways, and ``KEEL_FAST_PATH=false``
changes which code path runs, never the answer.

A route the fast path cannot reproduce exactly (query, header or cookie parameters, form bodies,
other dependencies) is refused when the app is built, naming the route.
"""

from __future__ import annotations

import email.message
import inspect
import json
import re
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, params
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.utils import request_body_to_args, request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic_core import PydanticUndefined as Undefined
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope

from keel.core.errors import render_exception


@dataclass(frozen=True)
class FastRoute:
    """A FastAPI route of the service to serve on the fast path.

    ``log_every`` samples the access log of this route: 1 (the default) logs every request; N logs
    one in N successful requests, while every error (status >= 400) and every slow request is
    still logged (see :class:`keel.core.observability.AccessLog`).
    """

    method: str
    path: str
    log_every: int = 1


Authorizer = Callable[[Headers, Any], Awaitable[Any]]


@dataclass(frozen=True)
class _Plan:
    """How to call one endpoint: which argument gets what."""

    route: APIRoute
    endpoint: Callable[..., Awaitable[Response]]
    platform_args: tuple[str, ...]
    auth_args: tuple[tuple[str, Any], ...]  # (argument, required scope)
    request_arg: str | None
    path_fields: list[Any]
    body_field: Any | None
    passed_on: tuple[str, ...] = ()  # paths its template matches that an earlier route serves


def compile_fast_routes(
    routers: Sequence[APIRouter],
    wanted: Sequence[FastRoute],
    platform_dependency: Callable[..., Any],
) -> list[tuple[FastRoute, _Plan]]:
    """Find each wanted route among ``routers`` and plan how to call its endpoint directly.

    ``routers`` come in the order FastAPI tries them: a route declared before a fast one that
    takes some of its requests answers those instead, on both paths.
    """
    by_key: dict[tuple[str, str], APIRoute] = {}
    ordered: list[Route] = []
    for router in routers:
        for candidate in router.routes:
            if isinstance(candidate, Route):
                ordered.append(candidate)
            if isinstance(candidate, APIRoute):
                for method in candidate.methods or ():
                    by_key.setdefault((method, candidate.path), candidate)
    plans = []
    for fast in wanted:
        route = by_key.get((fast.method, fast.path))
        if route is None:
            raise ValueError(f"fast route {fast.method} {fast.path} has no FastAPI route")
        plans.append((fast, _plan(route, platform_dependency, _earlier(ordered, route, fast))))
    return plans


def _earlier(ordered: list[Route], route: APIRoute, fast: FastRoute) -> tuple[str, ...]:
    """Literal paths of routes tried before ``route`` that its template also matches.

    Those requests are left to FastAPI. An earlier route with parameters of its own that overlaps
    is refused: which one FastAPI picks would depend on the path.
    """
    literal: list[str] = []
    for other in ordered[: ordered.index(route)]:
        if fast.method not in (other.methods or ()) or not _overlap(other.path, fast.path):
            continue
        if "{" in other.path:
            raise ValueError(
                f"fast route {fast.method} {fast.path}: {other.path}, declared before it,"
                " takes some of its requests"
            )
        literal.append(other.path)
    return tuple(literal)


def _overlap(a: str, b: str) -> bool:
    """Whether some path matches both templates (a segment with a parameter matches anything)."""
    left, right = a.split("/"), b.split("/")
    if any(":path}" in part for part in left + right):
        return True
    return len(left) == len(right) and all(
        x == y or "{" in x or "{" in y for x, y in zip(left, right, strict=True)
    )


def _plan(
    route: APIRoute, platform_dependency: Callable[..., Any], passed_on: tuple[str, ...] = ()
) -> _Plan:
    dep = route.dependant
    name = f"{sorted(route.methods or ())} {route.path}"
    unsupported = [
        dep.query_params,
        dep.header_params,
        dep.cookie_params,
        dep.background_tasks_param_name,
        dep.response_param_name,
        dep.security_scopes_param_name,
        dep.http_connection_param_name,
        len(dep.body_params) > 1,
        any(isinstance(field.field_info, params.Form) for field in dep.body_params),
        _lenient(route) and dep.body_params,  # JSON without a Content-Type: not read that way here
    ]
    if any(unsupported) or not inspect.iscoroutinefunction(route.endpoint):
        raise ValueError(f"{name}: only path, JSON body and keel dependencies can be fast")
    if not _returns_response(route.endpoint):
        raise ValueError(f"{name}: a fast endpoint returns a Response (no response_model pass)")
    platform_args: list[str] = []
    auth_args: list[tuple[str, Any]] = []
    for sub in dep.dependencies:
        if sub.call is platform_dependency and sub.name:
            platform_args.append(sub.name)
        elif getattr(sub.call, "keel_scope", None) is not None and sub.name:
            auth_args.append((sub.name, sub.call.keel_scope))  # type: ignore[union-attr]
        else:
            raise ValueError(f"{name}: dependency {sub.call!r} cannot be served on the fast path")
    return _Plan(
        route=route,
        endpoint=route.endpoint,
        platform_args=tuple(platform_args),
        auth_args=tuple(auth_args),
        request_arg=dep.request_param_name,
        path_fields=list(dep.path_params),
        body_field=dep.body_params[0] if dep.body_params else None,
        passed_on=passed_on,
    )


def _lenient(route: APIRoute) -> bool:
    strict = route.strict_content_type
    return not (strict.value if isinstance(strict, DefaultPlaceholder) else strict)


def _returns_response(endpoint: Callable[..., Any]) -> bool:
    """Whether the endpoint is declared to return a Response, which FastAPI passes through as is."""
    returned = typing.get_type_hints(endpoint).get("return")
    return isinstance(returned, type) and issubclass(returned, Response)


class FastPath:
    """Matches a request to a fast route and serves it by calling the route's endpoint."""

    def __init__(self, plans: list[tuple[FastRoute, _Plan]]) -> None:
        self.plans = plans
        self._exact: dict[tuple[str, str], tuple[FastRoute, _Plan]] = {}
        self._patterned: list[tuple[str, re.Pattern[str], tuple[FastRoute, _Plan]]] = []
        for fast, plan in plans:
            if "{" in fast.path:
                pattern = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", fast.path) + "$")
                self._patterned.append((fast.method, pattern, (fast, plan)))
            else:
                self._exact[(fast.method, fast.path)] = (fast, plan)

    def match(self, scope: Scope) -> tuple[tuple[FastRoute, _Plan], dict[str, str]] | None:
        """The route serving this request, with its path parameters, if it is a fast one."""
        method, path = scope["method"], scope["path"]
        found = self._exact.get((method, path))
        if found is not None:
            return found, {}
        for route_method, pattern, candidate in self._patterned:
            matched = pattern.match(path) if route_method == method else None
            if matched and path not in candidate[1].passed_on:
                return candidate, matched.groupdict()
        return None

    async def serve(
        self, plan: _Plan, params: dict[str, str], scope: Scope, receive: Receive
    ) -> Response:
        """The endpoint's response, or the problem response FastAPI would have rendered."""
        scope["route"] = plan.route  # what the access log and metrics label the request with
        scope["path_params"] = params
        try:
            return await _call(plan, params, scope, receive)
        except Exception as exc:
            return render_exception(exc)


async def _call(plan: _Plan, params: dict[str, str], scope: Scope, receive: Receive) -> Response:
    # The order is FastAPI's: read and parse the body, solve dependencies (auth, rate limit),
    # then validate path parameters and the body, reporting every validation error at once.
    headers = Headers(scope=scope)
    body: Any = Undefined
    raw = b""
    if plan.body_field is not None:
        raw = await _read_body(receive)
        body = _json_body(headers, raw)
    plat = scope["app"].state.platform
    values: dict[str, Any] = {}
    for arg in plan.platform_args:
        values[arg] = plat
    for arg, required in plan.auth_args:
        values[arg] = await plat.authorize(headers, required)
    errors: list[Any] = []
    if plan.path_fields:
        path_values, errors = request_params_to_args(plan.path_fields, params)
        values.update(path_values)
    if plan.body_field is not None:
        body_values, body_errors = await request_body_to_args([plan.body_field], body, False)
        values.update(body_values)
        errors += body_errors
    if errors:
        raise RequestValidationError(errors, body=body)
    if plan.request_arg is not None:
        if plan.body_field is not None:  # reading it again gets the body, as from FastAPI
            receive = _replay(raw, receive)
        request = Request(scope, receive)
        request._headers = headers  # parsed once, as Starlette caches them (no second parse)
        values[plan.request_arg] = request
    return await plan.endpoint(**values)


def _json_body(headers: Headers, raw: bytes) -> Any:
    """The body as FastAPI hands it to validation: JSON-decoded only with a JSON content type."""
    if not raw:
        return Undefined
    content_type = headers.get("content-type")
    if not content_type or not _is_json(content_type):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        error = {
            "type": "json_invalid",
            "loc": ("body", exc.pos),
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": exc.msg},
        }
        raise RequestValidationError([error], body=exc.doc) from exc
    except Exception as exc:
        raise HTTPException(400, "There was an error parsing the body") from exc


_JSON_TYPES: dict[str, bool] = {}


def _is_json(content_type: str) -> bool:
    """FastAPI's rule (``application/json`` or ``application/*+json``), remembered per value."""
    known = _JSON_TYPES.get(content_type)
    if known is None:
        message = email.message.Message()
        message["content-type"] = content_type
        subtype = message.get_content_subtype()
        known = message.get_content_maintype() == "application" and (
            subtype == "json" or subtype.endswith("+json")
        )
        if len(_JSON_TYPES) < 256:  # clients send a handful of spellings; never grow unbounded
            _JSON_TYPES[content_type] = known
    return known


def _replay(raw: bytes, receive: Receive) -> Receive:
    """``receive`` that first hands out the body already read, then passes on (disconnects)."""
    pending = [{"type": "http.request", "body": raw, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
