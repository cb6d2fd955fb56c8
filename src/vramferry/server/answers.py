"""Answers in OpenAI's error format, and waiting for a worker job on behalf of an HTTP request."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import Receive

from .generation import GenerationParams
from .media import encode_image
from .schemas import ImageData, ImageGenerationResponse
from .worker import (
    DeliveryError,
    GenerationOutOfMemory,
    GenerationWorker,
    Job,
    JobCancelled,
    QueueFull,
    WorkerStopped,
)

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's "client closed request": counted in the metrics, never seen by a client


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


def request_id(request: Request) -> str:
    """The id the guard gave this request (sent back in ``X-Request-Id``, and named in the log)."""
    return request.scope.get("state", {}).get("request_id", "-")


async def _client_gone(receive: Receive) -> None:
    """Return when the client closes the connection (the body has been read: the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def submit(worker: GenerationWorker, params: GenerationParams, **job: Any) -> Job:
    """``worker.submit(params, **job)``, its refusals as answers (429 for a full queue)."""
    try:
        return worker.submit(params, **job)
    except QueueFull as exc:
        retry = {"Retry-After": "1"}
        raise APIError(429, str(exc), type="rate_limit_error", code="queue_full", headers=retry) from None
    except WorkerStopped as exc:
        raise APIError(503, str(exc), type="server_error", code="worker_stopped") from None


async def run_job(
    worker: GenerationWorker,
    params: GenerationParams,
    request: Request,
    deadline: float,
    timeout: float,
    deliver: Any = None,
    alone: bool = False,
) -> Any:
    """Run ``params`` on the worker and wait for it, for the deadline, or for the client to leave; in the two
    last cases the job is given up at once (out of the queue, or stopped at its next step, or its images
    dropped from a batch that goes on for others). ``alone``: never in a batch with other requests."""
    rid = request_id(request)
    job = submit(worker, params, deadline=deadline, request_id=rid, deliver=deliver, alone=alone)
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


def _result(done: asyncio.Future, rid: str) -> Any:
    """The result of a finished job, or its failure as an :class:`APIError`."""
    if done.cancelled():
        raise APIError(503, "the generation worker stopped", type="server_error", code="worker_stopped")
    error = done.exception()
    if error is not None:
        raise failure(error, rid) from None
    return done.result()


def failure(error: BaseException, rid: str) -> APIError:
    """What a job's failure tells its client."""
    if isinstance(error, GenerationOutOfMemory):
        return APIError(503, str(error), type="server_error", code="out_of_memory")
    if isinstance(error, JobCancelled):
        return APIError(504, str(error), type="timeout_error", code="timeout")
    if isinstance(error, WorkerStopped):
        return APIError(503, str(error), type="server_error", code="worker_stopped")
    if isinstance(error, DeliveryError):
        return APIError(507, str(error), type="server_error", code="storage_full")
    # The pipeline's message stays in the log (it may name paths and internals); the id finds it there.
    message = f"generation failed (request {rid}); the server's log has the details"
    return APIError(500, message, type="server_error", code="generation_failed")


def image_encoder(output_format: str, compression: int | None) -> Callable[[list[Any]], list[bytes]]:
    """How a job's outputs become images in ``output_format`` (a video's first frame); checks ``compression``."""
    if compression is not None and output_format == "png":
        raise invalid(
            "output_compression: applies to jpeg and webp (png is lossless); leave it out",
            "output_compression",
        )

    def encode(outputs: list[Any]) -> list[bytes]:
        return [
            encode_image(item[0] if isinstance(item, list) else item, output_format, compression)
            for item in outputs
        ]

    return encode


async def answer_images(
    app: Any, params: GenerationParams, body: Any, request: Request
) -> ImageGenerationResponse:
    """Run an image request (a generation or an edit) on the app's worker and answer it."""
    settings, worker = app.state.settings, app.state.worker
    deliver = image_encoder(body.output_format, body.output_compression)
    worker.start()  # no-op when running; starts it for an app driven without its lifespan
    arrived = request.scope.get("state", {}).get("arrived", time.monotonic())
    alone = not getattr(body, "batch", True)  # edits have no "batch": they never share a call anyway
    images = await run_job(
        worker, params, request, arrived + settings.timeout, settings.timeout, deliver, alone=alone
    )
    data = [ImageData(b64_json=base64.b64encode(image).decode("ascii")) for image in images]
    return ImageGenerationResponse(created=int(time.time()), data=data, output_format=body.output_format)
