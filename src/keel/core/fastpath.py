"""Lean ASGI routes for measured hot paths, in front of FastAPI.

FastAPI's routing, dependency solving and pydantic validation cost about four times what a
posting itself costs (see the README's benchmark section). A :class:`FastRoute` serves one
``(method, path)`` with the same rules and the same answers — API-key auth and scopes, the rate
limit, problem+json errors with the same ``code``s — decoding the body with msgspec. The FastAPI
route of the same path stays declared, so ``/docs`` and ``/openapi.json`` still describe it, and it
serves the path whenever the fast path is switched off.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from keel.core.auth import ApiKey
from keel.core.auth import Scope as KeyScope
from keel.core.errors import invalid_request, problem_response, render_exception
from keel.core.limits import BodyTooLarge

log = logging.getLogger("keel.fastpath")

BodyT = TypeVar("BodyT")


@dataclass(frozen=True, slots=True)
class FastRequest(Generic[BodyT]):
    """What a fast handler gets: the decoded body, the caller's key, the headers, path params."""

    body: BodyT
    key: ApiKey
    headers: Headers
    path_params: dict[str, str]


FastHandler = Callable[[Any, FastRequest[Any]], Awaitable[Response]]


@dataclass(frozen=True)
class FastRoute:
    """One hot ``(method, path)``: ``{name}`` in the path matches one segment."""

    method: str
    path: str
    scope: KeyScope
    handler: FastHandler
    body_type: type[Any] | None = None

    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path) + "$")


_LOC = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_FIELD = re.compile(r"field `(?P<name>[^`]+)`")


def validation_problem(exc: msgspec.ValidationError) -> Response:
    """msgspec's message, in the shape FastAPI's validation errors have."""
    message = str(exc)
    loc: list[str] = ["body"]
    at = _LOC.search(message)
    if at:
        message = message[: at.start()]
        loc += [part for part in re.split(r"[.\[\]]", at.group("path")) if part]
    field = _FIELD.search(message)
    if field:
        loc.append(field.group("name"))
    return invalid_request([{"loc": loc, "msg": message}])


def _invalid_json(detail: str) -> Response:
    return problem_response(
        400,
        "invalid_json",
        "Malformed JSON",
        "The request body is not valid JSON.",
        errors=[{"loc": ["body"], "msg": detail}],
    )


class FastPath:
    """Serves the registered fast routes; passes everything else on to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        routes: list[FastRoute],
        enabled: bool = True,
        platform_of: Callable[[Scope], Any] = lambda scope: scope["app"].state.platform,
    ) -> None:
        self.app = app
        self.enabled = enabled
        self.platform_of = platform_of
        self._exact: dict[tuple[str, str], FastRoute] = {}
        self._patterned: list[tuple[str, re.Pattern[str], FastRoute]] = []
        for route in routes:
            if "{" in route.path:
                self._patterned.append((route.method, route.pattern(), route))
            else:
                self._exact[(route.method, route.path)] = route

    def match(self, scope: Scope) -> tuple[FastRoute, dict[str, str]] | None:
        """The fast route serving this request, with its path parameters, if any."""
        if not self.enabled or scope["type"] != "http":
            return None
        method, path = scope["method"], scope["path"]
        route = self._exact.get((method, path))
        if route is not None:
            return route, {}
        for route_method, pattern, candidate in self._patterned:
            found = pattern.match(path) if route_method == method else None
            if found:
                return candidate, found.groupdict()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = self.match(scope)
        if matched is None:
            await self.app(scope, receive, send)
            return
        route, params = matched
        scope["route"] = route  # what RequestObservation labels metrics and logs with
        response = await self._serve(route, params, scope, receive)
        await response(scope, receive, send)

    async def _serve(
        self, route: FastRoute, params: dict[str, str], scope: Scope, receive: Receive
    ) -> Response:
        headers = Headers(scope=scope)
        platform = self.platform_of(scope)
        try:
            key = await platform.api_keys.authenticate(headers, route.scope)
            await platform.rate_limiter.check(str(key.id))
            body: Any = None
            if route.body_type is not None:
                raw = await _read_body(receive)
                try:
                    body = msgspec.json.decode(raw, type=route.body_type)
                except msgspec.ValidationError as exc:
                    return validation_problem(exc)
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    return _invalid_json(str(exc))
            return await route.handler(platform, FastRequest(body, key, headers, params))
        except BodyTooLarge:
            raise  # BodyLimit answers it
        except Exception as exc:
            return render_exception(exc)


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
