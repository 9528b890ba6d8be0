"""keel's route class: a listing refuses query parameters it does not declare.

``GET /events?user=alice`` (for ``user_id``) would otherwise answer every event, as if the filter
were applied: a typo turned into a silent wrong answer. A route that declares query parameters
answers an unknown one with 422 ``validation_error`` naming it. Routes that declare none (every
fast route among them) are left alone, so both request paths answer alike.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from fastapi import APIRouter
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from keel.core.errors import invalid_request


class KeelRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        declared = {p.alias for part in _parts(self.dependant) for p in part.query_params}
        if not declared:
            return handler

        async def known_parameters_only(request: Request) -> Response:
            unknown = [name for name in request.query_params if name not in declared]
            if unknown:
                return invalid_request(
                    [{"loc": ["query", name], "msg": "Unknown query parameter"} for name in unknown]
                )
            return await handler(request)

        return known_parameters_only


def router(**options: Any) -> APIRouter:
    """An APIRouter of :class:`KeelRoute` routes: what every service's routes are made with."""
    return APIRouter(route_class=KeelRoute, **options)


def _parts(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _parts(sub)
