"""The HTTP server: an OpenAI-style images API in front of one pipeline and one worker thread.

Build it with :func:`create_app` (tests drive it in process with ``fastapi.testclient.TestClient``) and serve it
with uvicorn (``vramferry serve``).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import re
import secrets
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .generation import GenerationParams, disable_progress_bar, size_multiple, unsupported
from .metrics import ServerMetrics
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
    PlanSummary,
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

_SIZE = re.compile(r"^(\d{1,6})x(\d{1,6})$")
_NOT_BLANK = re.compile(NOT_BLANK)
_PUBLIC_PATHS = frozenset({"/health"})
GENERATIONS_PATH = "/v1/images/generations"


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
        max_body_bytes: the largest request body read.
        call_defaults: further keyword arguments for every pipeline call (``{"max_sequence_length": 64}``).
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

    def __post_init__(self) -> None:
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
    match = _SIZE.match(text)
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
    body: ImageGenerationRequest, settings: ServerSettings, pipeline: Any, multiple: int
) -> GenerationParams:
    """Check what depends on the settings and the pipeline, and fill in defaults."""
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
    )
    missing = unsupported(pipeline, params)
    if missing:
        names = {"steps": "num_inference_steps", "guidance": "guidance_scale"}
        param = names.get(missing[0], missing[0])
        raise invalid(f"{param}: the served pipeline ({type(pipeline).__name__}) does not take it", param)
    return params


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


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        error = APIError(exc.status_code, f"{request.url.path}: {detail}", type=kind)
        return error.response(headers=dict(exc.headers) if exc.headers else None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return APIError(
            500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error"
        ).response()


def _refusal(request: Request, settings: ServerSettings, expected: bytes | None) -> JSONResponse | None:
    """The 401 or 413 answer for a request that must not go further, else ``None``."""
    if expected is not None and request.url.path not in _PUBLIC_PATHS:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            error = APIError(
                401,
                "a valid API key is required: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )
            return error.response(headers={"WWW-Authenticate": "Bearer"})
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
        return APIError(
            413,
            f"request body: {length} bytes is over the limit of {settings.max_body_bytes}",
            type="invalid_request_error",
            code="body_too_large",
        ).response()
    return None


def _install_middleware(app: FastAPI, settings: ServerSettings, metrics: ServerMetrics) -> None:
    expected = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        counted = request.method == "POST" and request.url.path == GENERATIONS_PATH
        status = 500
        try:
            response = _refusal(request, settings, expected) or await call_next(request)
            status = response.status_code
            return response
        finally:
            if counted:  # every answer, validation errors and refusals included
                metrics.observe_request(status, time.perf_counter() - start)


def create_app(pipeline: Any, handle: Any = None, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``pipeline``.

    Args:
        pipeline: a callable diffusers-style pipeline (already offloaded, or not).
        handle: the ``OffloadHandle`` from ``vramferry.api.apply``, for the metrics; ``None`` without offload.
        settings: limits and defaults; :class:`ServerSettings` () when omitted.

    Returns:
        The app. Its worker thread starts with the app's lifespan (or on the first request) and stops with it.
    """
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    worker = GenerationWorker(pipeline, handle, settings.max_queue, metrics)
    multiple = settings.size_multiple or size_multiple(pipeline)
    disable_progress_bar(pipeline)

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
    _install_middleware(app, settings, metrics)
    _install_routes(app, pipeline, multiple)
    return app


def _install_routes(app: FastAPI, pipeline: Any, multiple: int) -> None:
    settings, worker, metrics = app.state.settings, app.state.worker, app.state.metrics
    started = int(time.time())

    @app.get("/health", response_model=Health, responses={503: ERROR_RESPONSES[503]})
    async def health() -> Any:
        if worker.dead:
            raise APIError(
                503, "the generation worker has stopped", type="server_error", code="worker_stopped"
            )
        return Health()

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

    async def generations(body: ImageGenerationRequest) -> Any:
        params = to_params(body, settings, pipeline, multiple)
        worker.start()  # no-op when running; starts it for an app driven without its lifespan
        images = await _run(worker, params, settings.timeout)
        data = [ImageData(b64_json=base64.b64encode(png).decode("ascii")) for png in images]
        return ImageGenerationResponse(created=int(time.time()), data=data)

    first = -(-settings.min_size // multiple) * multiple
    sides = list(range(first, settings.max_size + 1, multiple))
    # The body's type carries this server's limits into the OpenAPI schema (see request_model).
    generations.__annotations__["body"] = request_model(settings.model_name, settings.max_prompt_chars, sides)
    app.post(GENERATIONS_PATH, response_model=ImageGenerationResponse, responses=ERROR_RESPONSES)(generations)


async def _run(worker: GenerationWorker, params: GenerationParams, timeout: float) -> list[bytes]:
    try:
        job = worker.submit(params)
    except QueueFull as exc:
        retry = {"Retry-After": "1"}
        raise APIError(429, str(exc), type="rate_limit_error", code="queue_full", headers=retry) from None
    except WorkerStopped as exc:
        raise APIError(503, str(exc), type="server_error", code="worker_stopped") from None
    try:
        # shield: the timeout must not cancel the thread's future behind our back; job.cancel() does it explicitly.
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)), timeout)
    except asyncio.TimeoutError:
        job.cancel()
        raise APIError(
            504, f"the request did not finish within {timeout:g} s", type="timeout_error", code="timeout"
        ) from None
    except GenerationOutOfMemory as exc:
        raise APIError(503, str(exc), type="server_error", code="out_of_memory") from None
    except JobCancelled as exc:
        raise APIError(504, str(exc), type="timeout_error", code="timeout") from None
    except GenerationFailed as exc:
        raise APIError(
            500, f"generation failed: {exc}", type="server_error", code="generation_failed"
        ) from None


def plan_summaries(handle: Any) -> list[PlanSummary]:
    """Each plan the handle holds, as its request shape, predictions and per-component placement."""
    listed = getattr(handle, "plans", None)
    if not callable(listed):
        return []
    summaries = []
    for work, made in listed():
        placement = {}
        for c in made.components:
            resident = sum(b.value == "resident" for b in c.blocks)
            placement[c.name] = (
                f"{c.placement}, {resident}/{len(c.blocks)} blocks resident" if c.blocks else str(c.placement)
            )
        summaries.append(
            PlanSummary(
                size=f"{work.width}x{work.height}",
                frames=work.num_frames,
                steps=work.steps,
                predicted_step_s=made.predicted_step_s,
                predicted_peak_bytes=made.predicted_peak_bytes,
                placement=placement,
                current=made.placements == handle.plan.placements,
            )
        )
    return summaries


def _version() -> str:
    from .. import __version__

    return __version__
