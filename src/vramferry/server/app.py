"""The HTTP server: an OpenAI-style images API in front of one pipeline and one worker thread.

Build it with :func:`create_app` (tests drive it in process with ``fastapi.testclient.TestClient``) and serve it
with uvicorn (``vramferry serve``).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import inspect
import ipaddress
import logging
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .generation import GenerationParams, disable_progress_bar, size_multiple, unsupported
from .lora import check_lora_weights, lora_adapters
from .metrics import ServerMetrics
from .plans import plan_summaries
from .schemas import (
    ERROR_RESPONSES,
    NOT_BLANK,
    Health,
    ImageData,
    ImageGenerationRequest,
    ImageGenerationResponse,
    ModelCard,
    ModelList,
    PlanList,
    request_model,
)
from .worker import (
    GenerationFailed,
    GenerationOutOfMemory,
    GenerationWorker,
    JobCancelled,
    QueueFull,
    WorkerStopped,
)

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")  # used with fullmatch: ASCII digits, nothing after
_NOT_BLANK = re.compile(NOT_BLANK)
# A Host header: a name or IPv4 address, or an IPv6 address in brackets; then an optional port.
_HOST = re.compile(r"(?:\[(?P<ipv6>[0-9a-fA-F:.]+)\]|(?P<name>[^\[\]:/@\s]+))(?::[0-9]{1,5})?")
_PUBLIC_PATHS = frozenset({"/health"})
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
GENERATIONS_PATH = "/v1/images/generations"
REQUEST_ID_HEADER = "X-Request-Id"
CLIENT_CLOSED = 499  # nginx's "client closed request": counted in the metrics, never seen by a client


@dataclass(frozen=True)
class ServerSettings:
    """What the server accepts and how long it waits.

    Attributes:
        model_name: the id served by ``/v1/models``; a request's ``model``, when given, must equal it.
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``.
        max_queue: requests that may wait for the worker; more are answered 429.
        timeout: seconds a request may take, queueing included; then 504 (a request that has not started is
            not run; one that has is aborted at its next denoising step).
        max_size, min_size: bounds of each image side, in pixels.
        size_multiple: what sides must be a multiple of; ``None`` takes it from the pipeline (twice the VAE's
            scale factor, 16 for Flux).
        max_prompt_chars: the longest prompt (and negative prompt) accepted.
        default_size: ``(width, height)`` used when a request gives no size; ``None`` leaves it to the pipeline.
        default_steps, default_guidance: used when a request omits them; ``None`` leaves them to the pipeline.
        max_body_bytes: the largest request body read; a larger one is answered 413 as soon as the bytes read
            pass it (chunked bodies included) or at once when its ``Content-Length`` does.
        call_defaults: further keyword arguments for every pipeline call (``{"max_sequence_length": 64}``).
        allowed_hosts: the ``Host`` header values served (names or addresses, without port; ``"*.example.com"``
            matches its subdomains; ``"*"`` any host); others are answered 400. ``None`` (the default): a request
            that arrives on a loopback address must name a loopback host (``localhost``, ``127.0.0.1``, ``::1``),
            which stops DNS-rebinding pages from reaching a server bound to loopback; one that arrives on a network
            address is not checked (set this when serving on a network).
        header_timeout: seconds a connection may take to send a request's headers (the connection is closed
            then); applied by the uvicorn options of :func:`vramferry.server.uvicorn_options`.
    """

    model_name: str = "vramferry"
    api_key: str | None = None
    max_queue: int = 8
    timeout: float = 300.0
    max_size: int = 2048
    min_size: int = 64
    size_multiple: int | None = None
    max_prompt_chars: int = 4096
    default_size: tuple[int, int] | None = None
    default_steps: int | None = None
    default_guidance: float | None = None
    max_body_bytes: int = 1 << 20
    call_defaults: Mapping[str, Any] = field(default_factory=dict)
    allowed_hosts: tuple[str, ...] | None = None
    header_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.allowed_hosts is not None:
            if isinstance(self.allowed_hosts, str):
                raise ValueError(
                    f"allowed_hosts: must be a sequence of names, got the string {self.allowed_hosts!r}"
                )
            hosts = tuple(host.strip().lower() for host in self.allowed_hosts)
            if not hosts or not all(hosts):
                raise ValueError(f"allowed_hosts: must name at least one host, got {self.allowed_hosts!r}")
            object.__setattr__(self, "allowed_hosts", hosts)  # a list given is kept as a tuple (hashable)
        if not self.header_timeout > 0:
            raise ValueError(f"header_timeout: must be positive, got {self.header_timeout}")
        if self.max_body_bytes < 0:
            raise ValueError(f"max_body_bytes: must not be negative, got {self.max_body_bytes}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue: must be at least 1, got {self.max_queue}")
        if not self.timeout > 0:
            raise ValueError(f"timeout: must be positive, got {self.timeout}")
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"max_size: must be at least min_size ({self.min_size}), got {self.max_size}")
        if self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars: must be at least 1, got {self.max_prompt_chars}")
        if self.default_size is not None and not all(
            self.min_size <= side <= self.max_size for side in self.default_size
        ):
            raise ValueError(
                f"default_size: {self.default_size} is outside [{self.min_size}, {self.max_size}] pixels"
            )


class APIError(Exception):
    """An answer in OpenAI's error format."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers or self.headers)


def invalid(message: str, param: str | None) -> APIError:
    return APIError(400, message, type="invalid_request_error", param=param, code="invalid_value")


def parse_size(text: str, settings: ServerSettings, multiple: int) -> tuple[int, int]:
    """``"1024x768"`` → ``(1024, 768)``, within the settings' bounds; raises :class:`APIError` naming ``size``."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise invalid(f"size: {text!r} is not 'WIDTHxHEIGHT' (e.g. '1024x1024')", "size")
    width, height = int(match.group(1)), int(match.group(2))
    for side, value in (("width", width), ("height", height)):
        if not settings.min_size <= value <= settings.max_size:
            raise invalid(
                f"size: {side} {value} is outside [{settings.min_size}, {settings.max_size}] pixels", "size"
            )
        if value % multiple:
            raise invalid(
                f"size: {side} {value} is not a multiple of {multiple} (this pipeline's granularity)", "size"
            )
    return width, height


def to_params(
    body: ImageGenerationRequest,
    settings: ServerSettings,
    pipeline: Any,
    multiple: int,
    adapters: tuple[str, ...] = (),
) -> GenerationParams:
    """Check what depends on the settings and the pipeline, and fill in defaults. ``adapters``: the LoRA adapters
    loaded (a request without ``lora`` uses them all at weight 1.0)."""
    if body.model is not None and body.model != settings.model_name:
        raise APIError(
            400,
            f"model: this server serves {settings.model_name!r}, not {body.model!r}",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )
    for name in ("prompt", "negative_prompt"):
        text = getattr(body, name)
        if text is not None and len(text) > settings.max_prompt_chars:
            raise invalid(
                f"{name}: {len(text)} characters is over the limit of {settings.max_prompt_chars}", name
            )
    if not _NOT_BLANK.search(body.prompt):  # the same rule as the schema's pattern
        raise invalid("prompt: must not be empty", "prompt")
    size = settings.default_size
    if body.size is not None and body.size != "auto":
        size = parse_size(body.size, settings, multiple)
    params = GenerationParams(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        steps=body.num_inference_steps if body.num_inference_steps is not None else settings.default_steps,
        width=size[0] if size else None,
        height=size[1] if size else None,
        guidance=body.guidance_scale if body.guidance_scale is not None else settings.default_guidance,
        seed=body.seed if body.seed is not None else secrets.randbits(32),
        n=body.n,
        extra=dict(settings.call_defaults),
        lora=_lora_weights(body.lora, adapters),
    )
    missing = unsupported(pipeline, params)
    if missing:
        names = {"steps": "num_inference_steps", "guidance": "guidance_scale"}
        param = names.get(missing[0], missing[0])
        raise invalid(f"{param}: the served pipeline ({type(pipeline).__name__}) does not take it", param)
    return params


def _lora_weights(
    requested: Mapping[str, float] | None, adapters: tuple[str, ...]
) -> dict[str, float] | None:
    """A request's adapter weights, checked against the loaded adapters; ``None`` when none are loaded."""
    if requested is None:
        return dict.fromkeys(adapters, 1.0) if adapters else None
    problem = check_lora_weights(requested, adapters)
    if problem is not None:
        name, message = problem
        raise invalid(f"lora.{name}: {message}", f"lora.{name}")
    return dict(requested) if adapters else None  # {} on a server without adapters: nothing to switch off


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


def request_id(request: Request) -> str:
    """The id the guard gave this request (sent back in ``X-Request-Id``, and named in the log)."""
    return request.scope.get("state", {}).get("request_id", "-")


def _http_error(request: Request, exc: StarletteHTTPException, settings: ServerSettings) -> APIError:
    """Starlette's and FastAPI's own errors in our terms (what they raise while reading the body included)."""
    if exc.status_code == 413:  # the body limit, passed while the body was read (a chunked body)
        return APIError(
            413,
            f"request body: over the limit of {settings.max_body_bytes} bytes",
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
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return APIError(exc.status_code, f"{request.url.path}: {detail}", type=kind, headers=exc.headers)


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
    if api_key is not None and scope["path"] not in _PUBLIC_PATHS:
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
    if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
        # Refused before the body is read. A chunked body is limited while it is read (the route's max_body_size).
        return APIError(
            413,
            f"request body: {length} bytes is over the limit of {settings.max_body_bytes}",
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
            if scope["method"] == "POST" and scope["path"] == GENERATIONS_PATH:
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
    worker = GenerationWorker(pipeline, handle, settings.max_queue, metrics)
    multiple = settings.size_multiple or size_multiple(pipeline)
    disable_progress_bar(pipeline)
    adapters = lora_adapters(pipeline)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        logger.info(
            "serving %s (queue %d, timeout %.0f s)", settings.model_name, settings.max_queue, settings.timeout
        )
        yield
        worker.stop()

    app = FastAPI(title="vramferry", version=_version(), lifespan=lifespan)
    app.state.settings, app.state.worker, app.state.metrics = settings, worker, metrics
    _install_error_handlers(app)
    app.add_middleware(RequestGuard, settings=settings, metrics=metrics)
    _install_routes(app, pipeline, multiple, adapters)
    return app


def _install_routes(app: FastAPI, pipeline: Any, multiple: int, adapters: tuple[str, ...]) -> None:
    settings, worker, metrics = app.state.settings, app.state.worker, app.state.metrics
    started = int(time.time())

    @app.get("/health", response_model=Health, responses={503: ERROR_RESPONSES[503]})
    async def health() -> Any:
        if worker.dead:
            raise APIError(
                503, "the generation worker has stopped", type="server_error", code="worker_stopped"
            )
        return Health()

    # HEAD too (uptime probes ask with it); a route of its own, so its OpenAPI operation has an id of its own.
    app.head(
        "/health", response_model=Health, responses={503: ERROR_RESPONSES[503]}, operation_id="health_head"
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
        worker.start()  # no-op when running; starts it for an app driven without its lifespan
        arrived = request.scope.get("state", {}).get("arrived", time.monotonic())
        images = await _run(worker, params, request, arrived + settings.timeout, settings.timeout)
        data = [ImageData(b64_json=base64.b64encode(png).decode("ascii")) for png in images]
        return ImageGenerationResponse(created=int(time.time()), data=data)

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


async def _client_gone(receive: Receive) -> None:
    """Return when the client closes the connection (the body has been read: the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _run(
    worker: GenerationWorker, params: GenerationParams, request: Request, deadline: float, timeout: float
) -> list[bytes]:
    """Run ``params`` on the worker and wait for it, for the deadline, or for the client to leave; in the two
    last cases the job is given up at once (out of the queue, or stopped at its next step)."""
    rid = request_id(request)
    try:
        job = worker.submit(params, deadline=deadline, request_id=rid)
    except QueueFull as exc:
        retry = {"Retry-After": "1"}
        raise APIError(429, str(exc), type="rate_limit_error", code="queue_full", headers=retry) from None
    except WorkerStopped as exc:
        raise APIError(503, str(exc), type="server_error", code="worker_stopped") from None
    done = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_client_gone(request.receive))
    try:
        remaining = max(0.0, deadline - time.monotonic())
        await asyncio.wait((done, gone), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is shutting down
        worker.cancel(job, "the server is stopping")
        raise
    finally:
        disconnected = gone.done() and not gone.cancelled()
        gone.cancel()
    if disconnected or not done.done():  # a client that left gets no answer, even one ready at this moment
        reason = "the client closed the connection" if disconnected else "the request's deadline passed"
        worker.cancel(job, reason)
        if not done.done():
            done.cancel()  # the worker's answer, if one comes, goes nowhere
        elif not done.cancelled():
            done.exception()  # read, so that asyncio does not log a failure nobody asked for
        logger.info("request %s: given up (%s)", rid, reason)
        if disconnected:
            raise APIError(CLIENT_CLOSED, reason, type="invalid_request_error", code="client_closed")
        raise APIError(
            504, f"the request did not finish within {timeout:g} s", type="timeout_error", code="timeout"
        )
    return _result(done, rid)


def _result(done: asyncio.Future, rid: str) -> list[bytes]:
    """The images of a finished job, or its failure as an :class:`APIError`."""
    if done.cancelled():
        raise APIError(503, "the generation worker stopped", type="server_error", code="worker_stopped")
    try:
        return done.result()
    except GenerationOutOfMemory as exc:
        raise APIError(503, str(exc), type="server_error", code="out_of_memory") from None
    except JobCancelled as exc:
        raise APIError(504, str(exc), type="timeout_error", code="timeout") from None
    except WorkerStopped as exc:
        raise APIError(503, str(exc), type="server_error", code="worker_stopped") from None
    except GenerationFailed:
        # The pipeline's message stays in the log (it may name paths and internals); the id finds it there.
        message = f"generation failed (request {rid}); the server's log has the details"
        raise APIError(500, message, type="server_error", code="generation_failed") from None


def _version() -> str:
    from .. import __version__

    return __version__
