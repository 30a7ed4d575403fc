"""The ASGI app: `build_app(core)` wires the routes, the exception handlers, and the API-key and
response-counting middleware over a started `RouterCore`; the two generation routes are reached without
Starlette's routing (`GenerationRoutes`)."""

from __future__ import annotations

import secrets
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import NotFound
from services.router.core import ModelInfo, RouterCore
from services.router.metrics import RouterMetrics
from services.router.openai.chat import ChatCompletions
from services.router.openai.completions import Completions
from services.router.openai.errors import error_response, from_exception, from_validation_error
from services.router.openai.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from services.router.openai.tokenize import Tokenize
from services.router.openai.run import ClientGone

TIMING_HEADER = b"x-folio-timing"
"""A request header: with any non-empty value, a streamed completion's last event carries `folio_timing`, the
first token's hops (as the gRPC API's Timing.first_token_path; docs/router.md), for bench/serving.py."""

_COUNTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
                  "/detokenize")


class ApiKeyAndCount:
    """ASGI middleware: the bearer token on /v1/* (when a key is set), and a response counter by status.

    Plain ASGI rather than BaseHTTPMiddleware, which would sit between the client and the streaming
    response's disconnect detection."""

    def __init__(self, app, api_key: str | None, metrics: RouterMetrics):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        arrived_ns = time.monotonic_ns()
        path = scope["path"]
        label = path if path in _COUNTED_PATHS else "other"
        stamps = None
        if any(k == TIMING_HEADER and v for k, v in scope.get("headers") or ()):
            # The first token's hops on this side: this app's first sight of the request, and its first
            # event written (the first body of a stream carries the first token: the response starts with it).
            stamps = scope["folio.stamps"] = [("router.handler", arrived_ns)]

        status = None  # the response's status, counted once its first body message went out (a first token's
        # event leaves before this process's Prometheus bookkeeping)

        async def counting_send(message):
            nonlocal stamps, status
            if message["type"] == "http.response.start":
                await send(message)
                if stamps is not None:  # the response's head is written (the first event goes next)
                    stamps.append(("router.head", time.monotonic_ns()))
                status = message["status"]
                return
            if stamps is not None and message.get("body"):
                stamps.append(("router.sent", time.monotonic_ns()))
                stamps = None
            try:
                await send(message)
            finally:
                count()

        def count():
            nonlocal status
            if status is not None:
                self.metrics.http_requests.labels(label, str(status)).inc()
                status = None

        try:
            if self.expected is not None and path.startswith("/v1"):
                auth = dict(scope.get("headers") or []).get(b"authorization", b"")
                if not secrets.compare_digest(auth, self.expected):
                    resp = error_response(401, "Unauthorized: give the API key as 'Authorization: Bearer <key>'")
                    return await resp(scope, receive, counting_send)
            await self.app(scope, receive, counting_send)
        finally:
            count()  # (a response whose head went out and no body after it)


class BodyLimit:
    """ASGI middleware: a request body larger than `max_bytes` is refused with 413 before it is parsed
    (at once from Content-Length; for a chunked body, as soon as the bytes read pass the limit)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return (f"request body: larger than this server allows ({self.max_bytes} bytes; "
                "the router's --max-body-bytes raises it)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await error_response(413, self._message(), "body")(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI passes an HTTPException from reading the body on as is
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)


def model_card(m: ModelInfo, created: int) -> dict:
    return {"id": m.id, "object": "model", "created": created, "owned_by": "folio", "root": m.id, "parent": None,
            "max_model_len": m.max_model_len, "permission": []}


async def _guarded(fn, *args) -> Response:
    """Run an endpoint; every exception becomes OpenAI's error body here (the one mapping point)."""
    try:
        return await fn(*args)
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; the generation was cancelled
    except Exception as e:  # noqa: BLE001 - the one mapping point for this layer
        return from_exception(e)


def _generation_route(model: type[BaseModel], create):
    """A plain Starlette endpoint for a generation request: the body parsed and validated by pydantic in
    one call (`model_validate_json`), then `create(body, request)`. FastAPI's own route machinery (its
    dependency solving and body handling) cost ~0.1-0.15 ms more of every request's way to the engine on
    the CPU machine (docs/router.md); the errors are the same 400s (`from_validation_error`)."""

    async def endpoint(request: Request) -> Response:
        if (stamps := request.scope.get("folio.stamps")) is not None:
            stamps.append(("router.endpoint", time.monotonic_ns()))  # past the middleware and the routing
        try:
            body = model.model_validate_json(await request.body())
        except ValidationError as e:
            return from_validation_error(RequestValidationError(e.errors()))
        return await _guarded(create, body, request)

    return endpoint


class GenerationRoutes:
    """ASGI: a POST to a generation route goes straight to its endpoint; everything else to the FastAPI app.

    Starlette's layers on the way to a route (its error and exception middleware, the router's matching,
    the endpoint's wrapper) ran on every first token's way: ~0.08 ms of the H200 host's 0.36 from the
    app's first sight of a request to the engine call (docs/router.md). A generation endpoint maps its own
    errors (`_guarded`, `from_validation_error`), so it needs none of them; what is left is mapped here as
    the app's handlers would (the body limit's 413 while the body is read, anything else a 500). The routes
    stay registered in the app too (a GET gets its 405 there)."""

    def __init__(self, app, routes: dict):
        self.app = app
        self.routes = routes

    async def __call__(self, scope, receive, send):
        endpoint = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        try:
            response = await endpoint(Request(scope, receive, send))
        except StarletteHTTPException as e:  # (BodyLimit, while a chunked body is read)
            response = error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))
        except Exception as e:  # noqa: BLE001 - as the app's handler for Exception
            response = from_exception(e)
        await response(scope, receive, send)


def _version() -> dict:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return {"version": dist_version("folio")}
    except PackageNotFoundError:
        return {"version": "unknown"}


def build_app(core: RouterCore, api_key: str | None = None, metrics: RouterMetrics | None = None,
              request_timeout_s: float | None = None, tool_call_parser: str = "hermes") -> ApiKeyAndCount:
    """The ASGI app over a started `RouterCore`: the API key and the response count outermost, then the body
    limit, then the generation routes (`GenerationRoutes`) and the FastAPI app with every route."""
    metrics = metrics or RouterMetrics(core)
    app = FastAPI(title="Folio OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    _add_service_routes(app, core, metrics)
    completions = Completions(core, metrics, request_timeout_s)
    chat = ChatCompletions(core, metrics, request_timeout_s, tool_call_parser)

    generation = {"/v1/completions": _generation_route(CompletionRequest, completions.create),
                  "/v1/chat/completions": _generation_route(ChatCompletionRequest, chat.create)}
    for path, endpoint in generation.items():
        app.router.add_route(path, endpoint, ["POST"])

    tokenize = Tokenize(core)

    @app.post("/tokenize")
    async def create_tokenize(body: TokenizeRequest):
        return await _guarded(tokenize.tokenize, body)

    @app.post("/detokenize")
    async def create_detokenize(body: DetokenizeRequest):
        return await _guarded(tokenize.detokenize, body)

    body_limited = BodyLimit(GenerationRoutes(app, generation), max_bytes=core.limits.max_body_bytes)
    return ApiKeyAndCount(body_limited, api_key=api_key, metrics=metrics)  # outermost: counts the 413s too


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return from_validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):
        return from_exception(exc)


def _add_service_routes(app: FastAPI, core: RouterCore, metrics: RouterMetrics) -> None:
    """Health, version, metrics and the model list."""

    @app.get("/health")
    async def health():
        if not core.list_models():
            return error_response(503, "no live engine")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return _version()

    @app.get("/metrics")
    async def prometheus(request: Request):
        body, content_type = metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def list_models():
        created = int(time.time())
        return {"object": "list", "data": [model_card(m, created) for m in core.list_models()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        for m in core.list_models():
            if m.id == model_id:
                return model_card(m, int(time.time()))
        return from_exception(NotFound(f"model: {model_id!r} is not served here"))
