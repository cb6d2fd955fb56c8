"""The routes for what takes or makes more than a prompt and a picture: ``POST /v1/images/edits`` (pipelines that
take an input image) and the ``/v1/videos`` jobs (pipelines that take ``num_frames``).

Each is installed only where the served pipeline can do it: the OpenAPI schema then lists what this server does,
and another route's path answers 404 with a message saying why.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from pydantic import Field

from .answers import APIError, answer_images, invalid, request_id, submit
from .forms import read_body
from .generation import call_parameters, is_video_pipeline
from .media import VIDEO_FORMATS, UploadError, decode_upload
from .params import parse_size, to_params
from .schemas import (
    ERROR_RESPONSES,
    ImageEditRequest,
    ImageGenerationResponse,
    VideoDeleted,
    VideoList,
    VideoObject,
    VideoRequest,
    json_int,
    request_model,
)
from .settings import ServerSettings
from .videos import VideoJob, VideoStore, new_video_id

EDITS_PATH = "/v1/images/edits"
VIDEOS_PATH = "/v1/videos"
UPLOAD_PATHS = frozenset({EDITS_PATH, VIDEOS_PATH})  # bodies limited by max_upload_bytes, not max_body_bytes


def takes_image(pipeline: Any) -> bool:
    return "image" in call_parameters(pipeline)


def unserved_routes(pipeline: Any) -> dict[str, str]:
    """Path prefix → why this server does not serve it (the 404's message)."""
    name = type(pipeline).__name__
    unserved = {}
    if not is_video_pipeline(pipeline):
        unserved[VIDEOS_PATH] = f"{VIDEOS_PATH}: the served pipeline ({name}) makes images, not videos"
    if is_video_pipeline(pipeline) or not takes_image(pipeline):
        unserved[EDITS_PATH] = (
            f"{EDITS_PATH}: the served pipeline ({name}) takes no input image; serve an image-to-image, inpaint "
            "or edit pipeline (FluxImg2ImgPipeline, FluxKontextPipeline, QwenImageEditPipeline, ...)"
        )
    return unserved


def _form_schema(model: type, files: dict[str, str], required: tuple[str, ...]) -> dict[str, Any]:
    """The OpenAPI request body of a route that takes JSON (when it has no required file) or a form."""
    schema = model.model_json_schema()
    form = {
        **schema,
        "properties": {
            **schema["properties"],
            **{
                name: {"type": "string", "format": "binary", "description": text}
                for name, text in files.items()
            },
        },
        "required": [*schema.get("required", []), *required],
    }
    content: dict[str, Any] = {"multipart/form-data": {"schema": form}}
    if not required:
        content["application/json"] = {"schema": schema}
    return {"requestBody": {"required": True, "content": content}}


def _upload(data: bytes, settings: ServerSettings, what: str) -> Any:
    try:
        return decode_upload(data, max_pixels=settings.max_upload_pixels, what=what)
    except UploadError as exc:
        raise invalid(str(exc), what) from None


def _limited(app: FastAPI, base: type, multiple: int, adapters: tuple[str, ...], **fields: Any) -> type:
    """``base`` with this server's limits in its schema (see :func:`request_model`)."""
    settings: ServerSettings = app.state.settings
    first = -(-settings.min_size // multiple) * multiple
    sides = list(range(first, settings.max_size + 1, multiple))
    return request_model(settings.model_name, settings.max_prompt_chars, sides, adapters, base=base, **fields)


def install_media_routes(app: FastAPI, pipeline: Any, multiple: int, adapters: tuple[str, ...]) -> None:
    """Add the edits or the videos routes, whichever ``pipeline`` serves."""
    unserved = unserved_routes(pipeline)
    app.state.unserved = unserved
    if EDITS_PATH not in unserved:
        _install_edits(app, pipeline, multiple, adapters)
    if VIDEOS_PATH not in unserved:
        _install_videos(app, pipeline, multiple, adapters)


def _install_edits(app: FastAPI, pipeline: Any, multiple: int, adapters: tuple[str, ...]) -> None:
    settings: ServerSettings = app.state.settings
    takes_mask = "mask_image" in call_parameters(pipeline)
    model = _limited(app, ImageEditRequest, multiple, adapters)
    files = {"image": "The image to edit: PNG, JPEG or WebP (also accepted as 'image[]')."}
    if takes_mask:
        files["mask"] = "Where to edit (inpainting): white is repainted; the image's size."

    async def edits(request: Request) -> Any:
        body, uploads = await read_body(request, model, {"image": ("image", "image[]"), "mask": ("mask",)})
        if "image" not in uploads:
            raise invalid("image: is required (a PNG, JPEG or WebP file)", "image")
        image = _upload(uploads["image"], settings, "image")
        mask = None
        if "mask" in uploads:
            if not takes_mask:
                raise invalid(f"mask: the served pipeline ({type(pipeline).__name__}) takes no mask", "mask")
            mask = _upload(uploads["mask"], settings, "mask")
            if mask.size != image.size:
                raise invalid(f"mask: {mask.size[0]}x{mask.size[1]} is not the image's size", "mask")
        given: dict[str, Any] = {"image": image, "mask": mask, "strength": body.strength}
        if body.size in (None, "auto"):
            given["size"] = _input_size(image, settings, multiple)
        params = to_params(body, settings, pipeline, multiple, adapters, **given)
        return await answer_images(app, params, body, request)

    app.post(
        EDITS_PATH,
        response_model=ImageGenerationResponse,
        responses={**ERROR_RESPONSES, 415: ERROR_RESPONSES[400]},
        openapi_extra=_form_schema(model, files, ("image",)),
        max_body_size=settings.max_upload_bytes,
    )(edits)


def _input_size(image: Any, settings: ServerSettings, multiple: int) -> tuple[int, int]:
    """An edit without ``size`` keeps the input's size, which must then be one the server takes."""
    width, height = image.size
    try:
        return parse_size(f"{width}x{height}", settings, multiple)
    except APIError as exc:
        fit = [
            max(settings.min_size, min(settings.max_size, side // multiple * multiple))
            for side in (width, height)
        ]
        raise invalid(
            f"size: the image is {width}x{height}, which this server cannot make ({exc.message.split(': ', 1)[1]}); "
            f"give a size, e.g. '{fit[0]}x{fit[1]}'",
            "size",
        ) from None


def video_frames(body: VideoRequest, fps: int, pipeline: Any, settings: ServerSettings) -> int:
    """The frame count a video request asks for, checked against the pipeline's frame granularity (Wan makes
    4k+1 frames): ``num_frames`` must fit it; ``seconds × fps`` is rounded to the nearest count that does."""
    step = _frame_step(pipeline)
    if body.seconds is not None and body.num_frames is not None:
        raise invalid("seconds: give seconds or num_frames, not both", "seconds")
    if body.num_frames is not None:
        frames = body.num_frames
        if (frames - 1) % step:
            lower = (frames - 1) // step * step + 1
            raise invalid(
                f"num_frames: {frames} is not a multiple of {step} plus 1 (this pipeline's frame granularity); "
                f"try {lower} or {lower + step}",
                "num_frames",
            )
    elif body.seconds is not None:
        seconds = _seconds(body.seconds)
        frames = max(1, round((seconds * fps - 1) / step) * step + 1)
    else:
        default = inspect.signature(pipeline).parameters["num_frames"].default
        frames = default if isinstance(default, int) and default > 0 else 4 * fps // step * step + 1
    if frames > settings.max_frames:
        raise invalid(f"num_frames: {frames} frames is over the limit of {settings.max_frames}", "num_frames")
    return frames


def _frame_step(pipeline: Any) -> int:
    """What a video's frame count less one must be a multiple of (the VAE's temporal compression; 4 for Wan)."""
    step = getattr(pipeline, "vae_scale_factor_temporal", 1)
    return step if isinstance(step, int) and step > 0 else 1


def _seconds(value: str | float) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise invalid(f"seconds: {value!r} is not a number of seconds (e.g. '4')", "seconds") from None
    if not 0 < seconds < 1e6:  # NaN fails too
        raise invalid(f"seconds: {value!r} must be a positive number", "seconds")
    return seconds


def _install_videos(app: FastAPI, pipeline: Any, multiple: int, adapters: tuple[str, ...]) -> None:
    settings: ServerSettings = app.state.settings
    store: VideoStore = app.state.videos
    worker = app.state.worker
    files = (
        {"input_reference": "The first frame, for image-to-video pipelines: PNG, JPEG or WebP."}
        if takes_image(pipeline)
        else {}
    )
    responses = {**ERROR_RESPONSES, 404: ERROR_RESPONSES[400], 415: ERROR_RESPONSES[400]}
    model = _limited(app, VideoRequest, multiple, adapters, num_frames=_frames_field(pipeline, settings))

    async def create_video(request: Request) -> Any:
        body, uploads = await read_body(request, model, {"input_reference": ("input_reference",)})
        given: dict[str, Any] = {}
        if "input_reference" in uploads:
            if not files:
                raise invalid(
                    f"input_reference: the served pipeline ({type(pipeline).__name__}) takes no input image",
                    "input_reference",
                )
            given["image"] = _upload(uploads["input_reference"], settings, "input_reference")
        fps = body.fps or settings.default_fps
        given["frames"] = video_frames(body, fps, pipeline, settings)
        params = to_params(body, settings, pipeline, multiple, adapters, **given)
        return _start_job(app, params, body, fps, request_id(request)).describe()

    async def list_videos() -> VideoList:
        return VideoList(data=[record.describe() for record in reversed(store.listed())])

    async def retrieve_video(video_id: str) -> VideoObject:
        return store.get(video_id).describe()

    async def video_content(video_id: str, variant: str = "video") -> Any:
        if variant != "video":
            raise invalid(f"variant: {variant!r} is not served; only 'video'", "variant")
        record = store.get(video_id)
        path = record.path
        if record.status != "completed" or path is None:
            raise APIError(
                409,
                f"video {video_id!r} is {record.status}, not completed; poll GET {VIDEOS_PATH}/{video_id}",
                type="invalid_request_error",
                code="video_not_ready",
            )
        fmt = VIDEO_FORMATS[record.video_format]
        return FileResponse(path, media_type=fmt.media_type, filename=f"{video_id}{fmt.suffix}")

    async def delete_video(video_id: str) -> VideoDeleted:
        record = store.remove(video_id)
        if record.job is not None:
            worker.cancel(
                record.job, "its video job was deleted"
            )  # out of the queue, or stopped at its next step
        return VideoDeleted(id=video_id)

    app.post(
        VIDEOS_PATH,
        response_model=VideoObject,
        responses=responses,
        openapi_extra=_form_schema(model, files, ()),
        max_body_size=settings.max_upload_bytes,
    )(create_video)
    app.get(VIDEOS_PATH, response_model=VideoList, responses={401: ERROR_RESPONSES[401]})(list_videos)
    app.get(f"{VIDEOS_PATH}/{{video_id}}", response_model=VideoObject, responses=responses)(retrieve_video)
    content_types = {fmt.media_type: {} for fmt in VIDEO_FORMATS.values()}
    app.get(
        f"{VIDEOS_PATH}/{{video_id}}/content",
        response_class=FileResponse,
        responses={200: {"content": content_types}, 409: ERROR_RESPONSES[400], **responses},
    )(video_content)
    app.delete(f"{VIDEOS_PATH}/{{video_id}}", response_model=VideoDeleted, responses=responses)(delete_video)


def _frames_field(pipeline: Any, settings: ServerSettings) -> tuple[Any, Any]:
    """``num_frames`` with the counts this pipeline makes in its schema."""
    step = _frame_step(pipeline)
    counts = list(range(1, settings.max_frames + 1, step))
    return (
        json_int(ge=1, le=settings.max_frames) | None,
        Field(
            default=None,
            description=f"Frames: {step}k+1, at most {settings.max_frames} (not with seconds).",
            json_schema_extra={"enum": [*counts, None]},
        ),
    )


def _start_job(app: FastAPI, params: Any, body: Any, fps: int, rid: str) -> VideoJob:
    """Record a video job and queue it on the worker (its record is dropped if the queue refuses it)."""
    settings, store, worker = app.state.settings, app.state.videos, app.state.worker
    record = VideoJob(
        id=new_video_id(),
        created_at=int(time.time()),
        params=params,
        frames=params.frames,
        fps=fps,
        video_format=body.output_format,
        model=settings.model_name,
        request_id=rid,
        steps_total=params.steps,
    )
    store.add(record)

    def progress(step: int, total: int) -> None:
        record.steps_done, record.steps_total = step, total

    worker.start()  # no-op when running; starts it for an app driven without its lifespan
    try:
        record.job = submit(
            worker,
            params,
            deadline=time.monotonic() + settings.video_timeout,
            request_id=rid,
            deliver=store.writer(record),
            on_step=progress,
        )
    except APIError:
        store.remove(record.id)
        raise
    record.job.future.add_done_callback(store.on_done(record))
    return record
