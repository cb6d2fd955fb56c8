"""The HTTP server: an OpenAI-style API (images, edits and videos where the pipeline makes them, a page to try
it) in front of one pipeline and one worker thread.

Build it with :func:`create_app` (tests drive it in process with ``fastapi.testclient.TestClient``) and serve it
with uvicorn (``vramferry serve``).
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .answers import CLIENT_CLOSED, APIError, answer_images, invalid, request_id
from .generation import disable_progress_bar, size_multiple
from .lora import lora_adapters
from .media_routes import EDITS_PATH, UPLOAD_PATHS, install_media_routes
from .metrics import ServerMetrics
from .page import install_page, is_page_path
from .params import to_params
from .plans import plan_summaries
from .schemas import (
    ERROR_RESPONSES,
    Health,
    ImageGenerationRequest,
    ImageGenerationResponse,
    ModelCard,
    ModelList,
    PlanList,
    request_model,
)
from .settings import ServerSettings
from .videos import VideoStore
from .worker import GenerationWorker

logger = logging.getLogger(__name__)

# A Host header: a name or IPv4 address, or an IPv6 address in brackets; then an optional port.
_HOST = re.compile(r"(?:\[(?P<ipv6>[0-9a-fA-F:.]+)\]|(?P<name>[^\[\]:/@\s]+))(?::[0-9]{1,5})?")
_PUBLIC_PATHS = frozenset({"/health"})
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
GENERATIONS_PATH = "/v1/images/generations"
IMAGE_PATHS = frozenset({GENERATIONS_PATH, EDITS_PATH})  # the requests vramferry_requests_total counts
REQUEST_ID_HEADER = "X-Request-Id"


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        return APIError(
            400, "the request body is not valid JSON", type="invalid_request_error", code="invalid_json"
        )
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    elif first.get("type") == "missing":
        message = "is required"
    text = f"{param}: {message}" if param else f"request body: {message}"
    return invalid(text, param)


def _http_error(request: Request, exc: StarletteHTTPException, settings: ServerSettings) -> APIError:
    """Starlette's and FastAPI's own errors in our terms (what they raise while reading the body included)."""
    if exc.status_code == 413:  # the body limit, passed while the body was read (a chunked body)
        limit = settings.max_upload_bytes if request.url.path in UPLOAD_PATHS else settings.max_body_bytes
        return APIError(
            413,
            f"request body: over the limit of {limit} bytes",
            type="invalid_request_error",
            code="body_too_large",
        )
    if exc.status_code == 400 and isinstance(exc.__cause__, ClientDisconnect):
        return APIError(CLIENT_CLOSED, "the client closed the connection", type="invalid_request_error")
    if exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI's "error parsing the body": json.loads raised something other than JSONDecodeError (invalid
        # UTF-8, nesting past the recursion limit, an integer over Python's 4300 digits).
        return APIError(
            400, "the request body is not valid JSON", type="invalid_request_error", code="invalid_json"
        )
    unserved = getattr(request.app.state, "unserved", {})
    if exc.status_code == 404 and (
        path := next((p for p in unserved if request.url.path.startswith(p)), None)
    ):
        return APIError(404, unserved[path], type="invalid_request_error", code="not_served")
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": _allowed_methods(request)}
    return APIError(exc.status_code, f"{request.url.path}: {detail}", type=kind, headers=headers)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE and getattr(route, "methods", None):
            methods.update(route.methods)
    return ", ".join(sorted(methods))


def _install_error_handlers(app: FastAPI) -> None:
    settings = app.state.settings

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _http_error(request, exc, settings).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        logger.exception("request %s: unexpected error on %s", rid, request.url.path)
        return APIError(
            500, f"internal error (request {rid})", type="server_error", code="internal_error"
        ).response(headers={REQUEST_ID_HEADER: rid})


def _host_of(header: str | None) -> str | None:
    """The host in a ``Host`` header, lower-case, without port or brackets; ``None`` if malformed."""
    match = _HOST.fullmatch(header or "")
    if match is None:
        return None
    return (match["ipv6"] or match["name"]).lower()


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # not an IP address (a Unix socket, an in-process test client)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or ip).is_loopback


def host_allowed(host: str, allowed: tuple[str, ...] | None, local_address: str | None) -> bool:
    """Whether a request naming ``host`` (from :func:`_host_of`), received on ``local_address``, is served."""
    if allowed is None:
        if local_address is None or not _is_loopback(local_address):
            return True
        allowed = LOOPBACK_HOSTS
    return any(
        pattern == "*" or host == pattern or pattern.startswith("*.") and host.endswith(pattern[1:])
        for pattern in allowed
    )


def _refusal(scope: Scope, settings: ServerSettings, api_key: bytes | None) -> JSONResponse | None:
    """The 400, 401 or 413 answer for a request that must not go further, else ``None``."""
    headers = Headers(scope=scope)
    host = _host_of(headers.get("host"))
    server = scope.get("server")
    if host is None or not host_allowed(host, settings.allowed_hosts, server[0] if server else None):
        served = ", ".join(settings.allowed_hosts or LOOPBACK_HOSTS)
        return APIError(
            400,
            f"Host {headers.get('host')!r} is not served here (allowed: {served}); "
            "set ServerSettings.allowed_hosts (serve --allowed-hosts) to serve it",
            type="invalid_request_error",
            param="Host",
            code="invalid_host",
        ).response()
    if api_key is not None and scope["path"] not in _PUBLIC_PATHS and not is_page_path(scope["path"]):
        scheme, credentials = get_authorization_scheme_param(headers.get("authorization"))
        # RFC 7235: the scheme is case-insensitive. compare_digest: no timing hint about the key.
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode(), api_key):
            error = APIError(
                401,
                "a valid API key is required: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )
            return error.response(headers={"WWW-Authenticate": "Bearer"})
    length = headers.get("content-length")
    limit = settings.max_upload_bytes if scope["path"] in UPLOAD_PATHS else settings.max_body_bytes
    if length is not None and length.isdigit() and int(length) > limit:
        # Refused before the body is read. A chunked body is limited while it is read (the route's max_body_size).
        return APIError(
            413,
            f"request body: {length} bytes is over the limit of {limit}",
            type="invalid_request_error",
            code="body_too_large",
        ).response()
    return None


class RequestGuard:
    """ASGI middleware in front of every route: refuses what must not go further (Host, API key, declared body
    size), gives each request an id (``X-Request-Id``) and its arrival time, and counts generation answers.

    Pure ASGI, not ``@app.middleware``: the route must see the client's own ``http.disconnect`` to cancel its job.
    """

    def __init__(self, app: ASGIApp, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.api_key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # An id that a layer in front gave (Ray Serve's proxy, through the replica's middleware), else a new one.
        rid = scope.get("state", {}).get("request_id") or uuid.uuid4().hex
        # A copy: scope["state"] starts as a shallow copy of the lifespan state, shared by nothing else.
        scope["state"] = {**scope.get("state", {}), "request_id": rid, "arrived": time.monotonic()}
        status = 500  # what an exception that escapes the app becomes

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, rid)
            await send(message)

        try:
            refusal = _refusal(scope, self.settings, self.api_key)
            await (refusal or self.app)(scope, receive, send_with_id)
        finally:
            if scope["method"] == "POST" and scope["path"] in IMAGE_PATHS:
                # Every answer: validation errors, refusals and cancellations (499) included.
                self.metrics.observe_request(status, time.perf_counter() - start)


def create_app(
    pipeline: Any,
    handle: Any = None,
    settings: ServerSettings | None = None,
    *,
    metrics: ServerMetrics | None = None,
) -> FastAPI:
    """The FastAPI app serving ``pipeline``.

    Args:
        pipeline: a callable diffusers-style pipeline (already offloaded, or not).
        handle: the ``OffloadHandle`` from ``vramferry.api.apply``, for the metrics; ``None`` without offload.
        settings: limits and defaults; :class:`ServerSettings` () when omitted.
        metrics: what the app reports to and ``/metrics`` renders; a new :class:`ServerMetrics` when omitted (a
            Ray Serve replica passes one that renders every replica's, see :mod:`vramferry.server.ray`).

    Returns:
        The app. Its worker thread starts with the app's lifespan (or on the first request) and stops with it.
    """
    settings = settings or ServerSettings()
    metrics = metrics or ServerMetrics()
    worker = GenerationWorker(
        pipeline, handle, settings.max_queue, metrics, settings.max_batch, settings.batch_wait
    )
    multiple = settings.size_multiple or size_multiple(pipeline)
    disable_progress_bar(pipeline)
    adapters = lora_adapters(pipeline)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        logger.info(
            "serving %s (queue %d, timeout %.0f s, batches up to %d images)",
            settings.model_name,
            settings.max_queue,
            settings.timeout,
            settings.max_batch,
        )
        yield
        worker.stop()
        app.state.videos.close()

    app = FastAPI(title="vramferry", version=_version(), lifespan=lifespan)
    app.state.settings, app.state.worker, app.state.metrics = settings, worker, metrics
    app.state.videos = VideoStore(settings)
    _install_error_handlers(app)
    app.add_middleware(RequestGuard, settings=settings, metrics=metrics)
    _install_routes(app, pipeline, multiple, adapters)
    install_media_routes(app, pipeline, multiple, adapters)
    install_page(app, pipeline, multiple)
    return app


def _install_routes(app: FastAPI, pipeline: Any, multiple: int, adapters: tuple[str, ...]) -> None:
    settings, worker, metrics = app.state.settings, app.state.worker, app.state.metrics
    started = int(time.time())

    @app.get(
        "/health", response_model=Health, response_model_exclude_none=True, responses={503: ERROR_RESPONSES[503]}
    )
    async def health() -> Any:
        if worker.dead:
            raise APIError(
                503, "the generation worker has stopped", type="server_error", code="worker_stopped"
            )
        return Health(replicas=metrics.replicas())

    # HEAD too (uptime probes ask with it); a route of its own, so its OpenAPI operation has an id of its own.
    app.head(
        "/health",
        response_model=Health,
        response_model_exclude_none=True,
        responses={503: ERROR_RESPONSES[503]},
        operation_id="health_head",
    )(health)

    @app.get("/v1/models", response_model=ModelList, responses={401: ERROR_RESPONSES[401]})
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_name, created=started)])

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, 401: ERROR_RESPONSES[401]},
    )
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/plans", response_model=PlanList, responses={401: ERROR_RESPONSES[401]})
    async def plans() -> PlanList:
        """The plans made so far (``serve --sizes`` makes them at start; an unplanned shape adds its own)."""
        return PlanList(data=plan_summaries(worker.handle))

    async def generations(body: ImageGenerationRequest, request: Request) -> Any:
        params = to_params(body, settings, pipeline, multiple, adapters)
        return await answer_images(app, params, body, request)

    first = -(-settings.min_size // multiple) * multiple
    sides = list(range(first, settings.max_size + 1, multiple))
    # The body's type carries this server's limits into the OpenAPI schema (see request_model).
    generations.__annotations__["body"] = request_model(
        settings.model_name, settings.max_prompt_chars, sides, adapters
    )
    # max_body_size: FastAPI counts the bytes as it reads them, so a chunked body stops at the limit (413).
    if "max_body_size" not in inspect.signature(app.post).parameters:
        raise RuntimeError("the server needs fastapi>=0.164 (request body limits): pip install -U fastapi")
    route = app.post(
        GENERATIONS_PATH,
        response_model=ImageGenerationResponse,
        responses=ERROR_RESPONSES,
        max_body_size=settings.max_body_bytes,
    )
    route(generations)


def _version() -> str:
    from .. import __version__

    return __version__
