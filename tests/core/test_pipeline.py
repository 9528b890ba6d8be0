"""One request wrapper for every route: request id, body limit, access log, metrics and a
service's own middleware, alike whether the fast path or FastAPI serves the route."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Body, Request
from pydantic import BaseModel
from starlette.middleware import Middleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.bench.reference import ReferenceSettings, prepare_reference_database
from keel.core import observability
from keel.core.app import ServiceSpec, create_service_app
from keel.core.fastpath import FastRoute
from keel.core.observability import JsonFormatter, LoopBatchedHandler, TextFormatter
from keel.core.platform import AdminKey, WriteKey

router = APIRouter()


class Echo(BaseModel):
    text: str


@router.post("/echo", status_code=201)
async def echo(body: Echo, _key: WriteKey) -> Response:
    return Response(body.model_dump_json(), status_code=201, media_type="application/json")


@router.get("/plain")
async def plain(_key: WriteKey) -> Response:
    return Response(b"{}", media_type="application/json")


class Stamp:
    """A service's own middleware: marks every response it sees."""

    def __init__(self, app: ASGIApp, value: str) -> None:
        self.app = app
        self.value = value.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], (b"x-stamp", self.value)]
            await send(message)

        await self.app(scope, receive, stamped)


def _spec(middleware: list[Middleware]) -> ServiceSpec:
    return ServiceSpec(
        name="pipeline-test",
        title="pipeline test",
        description="",
        routers=[router],
        fast_routes=[FastRoute("POST", "/echo", log_every=10)],
        middleware=middleware,
    )


@pytest.fixture(params=[True, False], ids=["fast", "framework"])
async def client(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    url = f"sqlite:///{tmp_path / 'ref.db'}"
    key = await prepare_reference_database(url)
    settings = ReferenceSettings(
        database_url=url, fast_path=request.param, max_body_bytes=1024, access_log=True
    )
    app = create_service_app(_spec([Middleware(Stamp, value="service")]), settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://keel.test",
            headers={"Authorization": f"Bearer {key}"},
        ) as c,
    ):
        yield c


@pytest.mark.parametrize("path", ["/echo", "/plain"])
async def test_service_middleware_and_request_id_cover_every_route(
    client: httpx.AsyncClient, path: str
) -> None:
    method = "POST" if path == "/echo" else "GET"
    kwargs = {"json": {"text": "hi"}} if method == "POST" else {}
    response = await client.request(method, path, headers={"X-Request-ID": "req-1"}, **kwargs)
    assert response.status_code in (200, 201)
    assert response.headers["x-stamp"] == "service"
    assert response.headers["x-request-id"] == "req-1"
    refused = await client.request(method, path, headers={"Authorization": ""}, **kwargs)
    assert refused.status_code == 401
    assert refused.headers["x-stamp"] == "service" and refused.headers["x-request-id"]


async def test_body_limit_on_a_fast_route(client: httpx.AsyncClient) -> None:
    declared = await client.post("/echo", json={"text": "x" * 2000})
    assert declared.status_code == 413 and declared.json()["code"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"text": "'
        yield b"x" * 2000
        yield b'"}'

    streamed = await client.post(
        "/echo", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413 and streamed.json()["code"] == "payload_too_large"
    assert streamed.headers["x-request-id"]


async def test_metrics_count_fast_routes_by_template(client: httpx.AsyncClient) -> None:
    await client.post("/echo", json={"text": "hi"})
    metrics = (await client.get("/metrics")).text
    assert 'service="pipeline-test",status="201"' in metrics.replace(
        'method="POST",route="/echo",', ""
    )


class RecordingStream:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


@pytest.fixture(params=["text", "json"])
def keel_log(request: pytest.FixtureRequest) -> Iterator[RecordingStream]:
    """keel's own log set-up (the access log's direct path), writing to a recording stream."""
    stream = RecordingStream()
    observability.configure_logging(request.param, "INFO")
    handler = logging.root.handlers[0]
    assert isinstance(handler, LoopBatchedHandler)
    handler.setStream(stream)  # type: ignore[arg-type]
    yield stream
    handler.flush()
    logging.root.handlers.clear()
    observability._sink = None


async def test_access_lines_escape_control_characters(
    client: httpx.AsyncClient, keel_log: RecordingStream
) -> None:
    await client.get("/x%0Ay%1Bz%7F%C2%85")
    logging.root.handlers[0].flush()
    lines = keel_log.text.splitlines()
    access = [line for line in lines if "keel.access" in line]
    assert len(access) == 1, lines
    assert "\x1b" not in keel_log.text and "\x7f" not in keel_log.text
    assert "/x\\x0ay\\x1bz\\x7f\\x85" in access[0].replace("\\\\", "\\")


async def test_access_lines_escape_control_characters_through_logging(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="keel.access"):
        await client.get("/a%0Ab")
    (record,) = [r for r in caplog.records if r.name == "keel.access"]
    assert "\n" not in record.getMessage() and "/a\\x0ab" in record.getMessage()


async def test_sampled_route_logs_one_in_n_successes_and_every_error(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="keel.access"):
        for _ in range(20):
            assert (await client.post("/echo", json={"text": "hi"})).status_code == 201
        for _ in range(3):
            assert (await client.post("/echo", json={"text": 1})).status_code == 422
        for _ in range(3):
            assert (await client.get("/plain")).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "keel.access"]
    assert sum(" /echo 201 " in line for line in lines) == 2
    assert sum(" /echo 422 " in line for line in lines) == 3
    assert sum(" /plain 200 " in line for line in lines) == 3


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_direct_access_lines_read_as_logging_would_write_them(
    formatter: TextFormatter | JsonFormatter,
) -> None:
    fields = {"method": "GET", "path": "/a", "status": 200, "duration_ms": 1.5, "service": "s"}
    for created in (1_795_000_000.001, 1_795_000_000.999, 1_795_003_600.25):
        record = logging.LogRecord("keel.access", logging.INFO, "", 0, "GET /a 200 1.5ms", (), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        record.__dict__.update(fields)
        record.request_id = "rid"
        direct = formatter.line(created, "keel.access", "rid", "GET /a 200 1.5ms", fields)
        assert direct == formatter.format(record)


def test_a_route_the_fast_path_cannot_reproduce_is_refused_at_build() -> None:
    odd = APIRouter()

    @odd.get("/query")
    async def with_query(q: str, _key: WriteKey) -> Response:
        return Response(q)

    @odd.get("/model")
    async def with_model(_key: WriteKey) -> Echo:
        return Echo(text="")

    for path in ("/query", "/model", "/missing"):
        spec = ServiceSpec("odd", "odd", "", [odd], fast_routes=[FastRoute("GET", path)])
        with pytest.raises(ValueError, match=path):
            create_service_app(spec, ReferenceSettings(database_url="sqlite://"))


async def test_access_lines_escape_unicode_line_breaks(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="keel.access"):
        await client.get("/a%E2%80%A8b%E2%80%A9c%C2%A0d")  # LINE and PARAGRAPH SEPARATOR, NBSP
    (record,) = [r for r in caplog.records if r.name == "keel.access"]
    assert len(record.getMessage().splitlines()) == 1, record.getMessage()
    assert "/a\\u2028b\\u2029c" in record.getMessage()


@pytest.mark.parametrize(
    "sent", ["req-1] GET /users/1 200 0.1ms", 'a"b', "a b", "a\\b", "x" * 129, "é"]
)
async def test_a_request_id_that_could_forge_a_log_line_is_replaced(
    client: httpx.AsyncClient, sent: str
) -> None:
    response = await client.get("/plain", headers={"X-Request-ID": sent.encode("latin-1")})
    rid = response.headers["x-request-id"]
    assert rid != sent and " " not in rid and "]" not in rid


@pytest.mark.parametrize("sent", ["req-1", "0af7651916cd43dd8448eb211c80319c", "a.b:c/d+e=_@"])
async def test_a_plain_request_id_is_kept(client: httpx.AsyncClient, sent: str) -> None:
    response = await client.get("/plain", headers={"X-Request-ID": sent})
    assert response.headers["x-request-id"] == sent


tricky = APIRouter()


@tricky.post("/embedded")
async def embedded(text: Annotated[str, Body(embed=True)], _key: WriteKey) -> Response:
    return Response(text)


lenient_router = APIRouter(strict_content_type=False)  # JSON without a Content-Type


@lenient_router.post("/lenient")
async def lenient(body: Echo, _key: WriteKey) -> Response:
    return Response(body.text)


@tricky.post("/raw")
async def raw_too(body: Echo, request: Request, _key: WriteKey) -> Response:
    return Response(await request.body())  # the raw body beside the parsed one


@tricky.get("/things/special")
async def special(_key: AdminKey) -> Response:
    return Response(b"special")


@tricky.get("/things/{thing_id}")
async def thing(thing_id: int, _key: WriteKey) -> Response:
    return Response(str(thing_id))


@tricky.get("/names/{name}")
async def name_first(name: str, _key: WriteKey) -> Response:
    return Response(f"first {name}")


@tricky.get("/names/{other}")
async def name_second(other: str, _key: WriteKey) -> Response:
    return Response(f"second {other}")


@pytest.mark.parametrize(
    ("route", "request_args"),
    [
        (FastRoute("POST", "/embedded"), ("POST", "/embedded", {"json": {"text": "hi"}})),
        (FastRoute("POST", "/lenient"), ("POST", "/lenient", {"content": b'{"text": "hi"}'})),
        (FastRoute("GET", "/things/{thing_id}"), ("GET", "/things/special", {})),
        (FastRoute("GET", "/things/{thing_id}"), ("GET", "/things/7", {})),
        (FastRoute("GET", "/names/{other}"), ("GET", "/names/x", {})),
        (FastRoute("POST", "/raw"), ("POST", "/raw", {"json": {"text": "hi"}})),
    ],
    ids=[
        "embedded-body",
        "lenient-content-type",
        "shadowed-by-an-earlier-literal-route",
        "beside-an-earlier-literal-route",
        "shadowed-by-an-earlier-parameter-route",
        "endpoint-reads-the-body-again",
    ],
)
async def test_a_fast_route_answers_as_fastapi_does_or_is_refused(
    tmp_path: Path, route: FastRoute, request_args: tuple[str, str, dict[str, Any]]
) -> None:
    url = f"sqlite:///{tmp_path / 'ref.db'}"
    key = await prepare_reference_database(url)
    answers = []
    for fast in (False, True):
        routers = [tricky, lenient_router]
        spec = ServiceSpec("tricky", "tricky", "", routers, fast_routes=[route])
        settings = ReferenceSettings(database_url=url, fast_path=fast, access_log=False)
        try:
            app = create_service_app(spec, settings)
        except ValueError:
            assert fast
            return  # refused at build: fine
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://keel.test",
                headers={"Authorization": f"Bearer {key}"},
            ) as c,
        ):
            method, path, kwargs = request_args
            async with asyncio.timeout(5):
                response = await c.request(method, path, **kwargs)
            answers.append((response.status_code, response.text))
    assert answers[0] == answers[1]


async def test_made_up_methods_cannot_grow_the_metrics_without_bound(
    client: httpx.AsyncClient,
) -> None:
    """HTTP allows any token as a method (h11 serves them); each must not be a new label set."""
    for n in range(50):
        assert (await client.request(f"MADEUP{n}", "/plain")).status_code == 405
    metrics = (await client.get("/metrics")).text
    assert "MADEUP" not in metrics
    assert 'method="OTHER"' in metrics
