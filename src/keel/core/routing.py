"""keel's route class: a listing refuses query parameters it does not declare, or declares once.

``GET /events?user=alice`` (for ``user_id``) would otherwise answer every event, as if the filter
were applied: a typo turned into a silent wrong answer. Likewise ``?limit=5&limit=500`` would
quietly take the last value. A route that declares query parameters answers an unknown one, or a
single-valued one given twice, with 422 ``validation_error`` naming it. Routes that declare none
(every fast route among them) are left alone, so both request paths answer alike.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from types import UnionType
from typing import Any, Union, get_args, get_origin

from fastapi import APIRouter
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from keel.core.errors import invalid_request


class KeelRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        params = [p for part in _parts(self.dependant) for p in part.query_params]
        declared = {p.alias for p in params}
        if not declared:
            return handler
        single = {p.alias for p in params if not _many_valued(p.field_info.annotation)}

        async def known_parameters_only(request: Request) -> Response:
            given = Counter(name for name, _ in request.query_params.multi_items())
            errors = [
                {"loc": ["query", name], "msg": "Unknown query parameter"}
                for name in given
                if name not in declared
            ] + [
                {"loc": ["query", name], "msg": "Query parameter given more than once"}
                for name, times in given.items()
                if name in single and times > 1
            ]
            if errors:
                return invalid_request(errors)
            return await handler(request)

        return known_parameters_only


def router(**options: Any) -> APIRouter:
    """An APIRouter of :class:`KeelRoute` routes: what every service's routes are made with."""
    return APIRouter(route_class=KeelRoute, **options)


def _many_valued(annotation: Any) -> bool:
    """Whether a query parameter takes a list (``list[str] | None`` and the like)."""
    if get_origin(annotation) in (Union, UnionType):
        return any(_many_valued(arg) for arg in get_args(annotation))
    return get_origin(annotation) in (list, tuple, set, frozenset)


def _parts(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _parts(sub)
