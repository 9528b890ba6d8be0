"""Every service answers the same with the fast path on and off (``KEEL_FAST_PATH``).

For each service in the registry, the same requests go to two copies of it, each on its own fresh
database: one serving its fast routes on the fast path, one serving everything through FastAPI.
Generic cases are derived from the service's fast routes (auth, scopes, content types, malformed
and oversized bodies, bad path parameters); a service adds its own in ``tests/<name>/fast_cases.py``
(``CASES`` and ``async prepare(client) -> ids``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from keel.core.app import KeelApp
from keel.core.auth import Scope, create_api_key
from keel.core.database import Database, create_engine
from keel.core.migrate import upgrade
from keel.registry import ServiceEntry, services

Case = tuple[str, str, Any, dict[str, str]]
VOLATILE = re.compile(r"(_at|_id)$|^id$")  # generated per database: ids may differ, times do


def _app(entry: ServiceEntry, database_url: str, fast_path: bool) -> KeelApp:
    module, _, name = entry.app_factory.partition(":")
    settings = entry.settings_class()(
        database_url=database_url,
        rate_limit="100000/second",
        access_log=False,
        fast_path=fast_path,
        outbox_worker=False,
    )
    app = getattr(importlib.import_module(module), name)(settings)
    assert isinstance(app, KeelApp)
    return app


@asynccontextmanager
async def _service(
    entry: ServiceEntry, directory: Path, fast_path: bool
) -> AsyncIterator[tuple[KeelApp, httpx.AsyncClient, dict[str, str]]]:
    url = f"sqlite:///{directory / f'{entry.name}-{fast_path}.db'}"
    await upgrade(url, [entry.migrations])
    database = Database(create_engine(url))
    async with database.write() as conn:
        keys = {scope.value: await create_api_key(conn, scope=scope) for scope in Scope}
    await database.dispose()
    app = _app(entry, url, fast_path)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://keel.test",
            headers={"Authorization": f"Bearer {keys['admin']}"},
        ) as client,
    ):
        yield app, client, keys


def generic_cases(app: KeelApp) -> list[Case]:
    """Cases every fast route must answer the same way, from its method and path alone."""
    assert app.spec is not None
    limit = 1024 * 1024  # the default body limit the apps run with
    cases: list[Case] = []
    for route in app.spec.fast_routes:
        paths = [re.sub(r"\{\w+\}", value, route.path) for value in ("1", "0", "abc", "%0A")]
        paths = list(dict.fromkeys(paths))
        for path in paths:
            cases += [
                (route.method, path, None, {}),
                (route.method, path, None, {"Authorization": ""}),
                (route.method, path, None, {"Authorization": "Bearer nope"}),
                (route.method, path, None, {"Authorization": "Basic abc"}),
                (route.method, path, None, {"Authorization": "{read}"}),
            ]
        if route.method in ("GET", "DELETE", "HEAD"):
            continue
        path = paths[0]
        json_type = {"Content-Type": "application/json"}
        cases += [
            (route.method, path, {}, {}),
            (route.method, path, [1], {}),
            (route.method, path, {"zz_unknown": 1}, {}),
            (route.method, path, b"null", json_type),
            (route.method, path, b"{not json", json_type),
            (route.method, path, b"{not json", {**json_type, "Authorization": "Bearer nope"}),
            (route.method, path, b"\xff\xfe{", json_type),
            (route.method, path, b"{}", {}),
            (route.method, path, b"{}", {"Content-Type": "text/plain"}),
            (route.method, path, b"{}", {"Content-Type": "application/merge-patch+json"}),
            (route.method, path, b"{}", {"Content-Type": "application/json; charset=utf-8"}),
            (route.method, path, b'"' + b"x" * limit + b'"', json_type),
            (route.method, path, "chunked-oversize", json_type),
        ]
    return cases


async def _chunked(parts: list[bytes]) -> AsyncIterator[bytes]:
    """A body sent without Content-Length, so only the streamed limit can stop it."""
    for part in parts:
        yield part


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "*" if VOLATILE.search(k) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


async def _ask(
    client: httpx.AsyncClient, case: Case, ids: dict[str, Any], keys: dict[str, str]
) -> Any:
    method, path, body, headers = case
    headers = {k: v.replace("{read}", f"Bearer {keys['read']}") for k, v in headers.items()}
    kwargs: dict[str, Any] = {"headers": headers}
    if body == "chunked-oversize":
        kwargs["content"] = _chunked([b'"', b"x" * (1024 * 1024), b'"'])
    elif isinstance(body, bytes):
        kwargs["content"] = body
    elif body is not None:
        kwargs["json"] = _fill(body, ids)
    response = await client.request(method, _fill(path, ids), **kwargs)
    assert response.headers.get("x-request-id"), case
    try:
        payload: Any = response.json()
    except ValueError:
        payload = response.text
    kept = {
        h: response.headers.get(h) for h in ("content-type", "retry-after", "idempotent-replayed")
    }
    return response.status_code, kept, _scrub(payload)


def _fill(value: Any, ids: dict[str, Any]) -> Any:
    """ "{a}" becomes the value of ids["a"]; a longer string has its {names} formatted in."""
    if isinstance(value, str):
        whole = re.fullmatch(r"\{(\w+)\}", value)
        if whole:
            return ids[whole.group(1)]
        return value.format(**ids) if "{" in value else value
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


def _service_cases(name: str) -> tuple[list[Case], Any]:
    try:
        module = importlib.import_module(f"tests.{name}.fast_cases")
    except ModuleNotFoundError:
        return [], None
    return list(module.CASES), module.prepare


async def _answers(
    entry: ServiceEntry, directory: Path, fast_path: bool
) -> tuple[list[Case], list[Any]]:
    own, prepare = _service_cases(entry.name)
    async with _service(entry, directory, fast_path) as (app, client, keys):
        if fast_path:
            _assert_served_fast(app)
        ids = await prepare(client) if prepare is not None else {}
        cases = generic_cases(app) + own
        return cases, [await _ask(client, case, ids, keys) for case in cases]


def _assert_served_fast(app: KeelApp) -> None:
    """The comparison means something only if the fast path really serves these routes."""
    assert app.spec is not None and app.fast_path is not None
    for route in app.spec.fast_routes:
        path = re.sub(r"\{\w+\}", "1", route.path)
        assert app.fast_path.match({"method": route.method, "path": path}) is not None


def _services() -> Iterator[ServiceEntry]:
    yield from services().values()


@pytest.mark.parametrize("entry", list(_services()), ids=lambda e: e.name)
async def test_fast_path_and_framework_answer_alike(entry: ServiceEntry, tmp_path: Path) -> None:
    cases, fast = await _answers(entry, tmp_path, fast_path=True)
    _, slow = await _answers(entry, tmp_path, fast_path=False)
    for case, fast_answer, slow_answer in zip(cases, fast, slow, strict=True):
        assert fast_answer == slow_answer, case
    assert any(answer[0] < 300 for answer in fast), "no case succeeded: the cases test nothing"


@pytest.mark.parametrize("entry", list(_services()), ids=lambda e: e.name)
async def test_fast_routes_stay_documented(entry: ServiceEntry, tmp_path: Path) -> None:
    async with _service(entry, tmp_path, fast_path=True) as (app, client, _keys):
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert app.fast_path is not None
        for fast, plan in app.fast_path.plans:
            if plan.route.include_in_schema:  # a legacy alias may stay out of the schema
                assert fast.method.lower() in paths[fast.path], fast
