"""Request and response bodies of the HTTP API (OpenAI images API, with vLLM-Omni's extensions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model
from pydantic_core import PydanticCustomError

from .lora import MAX_LORA_WEIGHT

MAX_IMAGES_PER_REQUEST = 10
MAX_STEPS = 200
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1

# "Not blank": a character outside JSON Schema's (ECMAScript's) \s. Python's \s also matches \x1c-\x1f and \x85, so
# the class is spelled out; the server checks prompts with this same pattern.
NOT_BLANK = r"[^\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"


def _json_integer(value: Any) -> Any:
    # JSON Schema's "integer" is any number without a fractional part (108.0 too), but never a boolean or a string.
    if isinstance(value, (bool, str)):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


def json_int(**bounds: int) -> Any:
    """An integer as JSON Schema defines it (the rest of the request is parsed strictly), within ``bounds``.

    The bounds come before the validator so that pydantic writes them into the schema as minimum/maximum.
    """
    return Annotated[int, Field(strict=False, **bounds), BeforeValidator(_json_integer)]


OutputFormat = Literal["png", "jpeg", "webp"]
# output_compression only with jpeg or webp (png, the default, is lossless): the route answers 400 otherwise.
COMPRESSION_RULE = {
    "anyOf": [
        {"properties": {"output_compression": {"type": "null"}}},
        {"required": ["output_format"], "properties": {"output_format": {"enum": ["jpeg", "webp"]}}},
    ]
}
LoraWeight = Annotated[float, Field(ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT, allow_inf_nan=False)]


class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations``.

    Limits that depend on the served pipeline or the server's settings (prompt length, the size's bounds and the
    multiple it must be of, the model name) are checked by the route, which names the field in its 400 answer.
    """

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=COMPRESSION_RULE)

    prompt: str = Field(description="What to generate.")
    model: str | None = Field(default=None, description="Must name the served model when given.")
    n: json_int(ge=1, le=MAX_IMAGES_PER_REQUEST) = Field(default=1, description="Number of images.")
    size: str | None = Field(
        default=None,
        description="'WIDTHxHEIGHT' in pixels, or 'auto' (the server's default size).",
        examples=["512x512"],
    )
    response_format: Literal["b64_json"] = Field(default="b64_json", description="Only 'b64_json' is served.")
    output_format: OutputFormat = Field(default="png", description="The images' format.")
    output_compression: json_int(ge=0, le=100) | None = Field(
        default=None, description="jpeg and webp only: the quality, 0 to 100 (100, the default, is the best)."
    )
    user: str | None = Field(default=None, description="Accepted for compatibility; ignored.")
    negative_prompt: str | None = Field(default=None, description="What to steer away from.")
    # Bounds go inside Annotated: on an optional field pydantic would not write them into the JSON schema.
    num_inference_steps: json_int(ge=1, le=MAX_STEPS) | None = Field(
        default=None, description="Denoising steps."
    )
    guidance_scale: Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)] | None = Field(
        default=None, description="Guidance scale."
    )
    seed: json_int(ge=0, le=MAX_SEED) | None = Field(
        default=None,
        description="Seed of the first image; image i uses seed + i. Random when omitted.",
    )
    lora: dict[str, LoraWeight] | None = Field(
        default=None,
        description="LoRA adapter name -> weight; adapters not named are off, {} turns LoRA off. "
        "Omitted: every loaded adapter at weight 1.0.",
    )
    batch: bool = Field(
        default=True,
        description="Whether this request may share a pipeline call with others queued with the same size, "
        "steps, guidance and LoRA weights. A batched image may differ slightly from the same request run "
        "alone; false runs it alone, so that a repeat with the same seed gives the same image.",
    )


def request_model(
    model_name: str,
    max_prompt_chars: int,
    sides: Sequence[int],
    adapters: Sequence[str] = (),
    base: type[BaseModel] = ImageGenerationRequest,
    **fields: Any,
) -> type[Any]:
    """``base`` (:class:`ImageGenerationRequest` by default) with one server's limits written into its JSON schema.

    The schema then says exactly what the server accepts (the served model's name, the prompt's length, the image
    sides allowed), so schema-driven clients and fuzzers generate valid requests. The route still checks these
    itself, with messages that name the field. ``adapters``: the LoRA adapters loaded, the only names ``lora`` takes.
    ``fields``: further field overrides, as ``create_model`` takes them.
    """
    names = {"propertyNames": {"enum": list(adapters)}} if adapters else {"maxProperties": 0}
    side = "|".join(str(value) for value in sides)
    size_pattern = f"^(auto|({side})x({side}))$"
    sizes = (
        f"{sides[0]} to {sides[-1]} in steps of {sides[1] - sides[0]}" if len(sides) > 1 else str(sides[0])
    )
    return create_model(
        base.__name__,
        __base__=base,
        **fields,
        prompt=(
            str,
            Field(
                min_length=1,
                max_length=max_prompt_chars,
                description="What to generate; not blank.",
                json_schema_extra={"pattern": NOT_BLANK},
            ),
        ),
        negative_prompt=(
            str | None,
            Field(default=None, max_length=max_prompt_chars, description="What to steer away from."),
        ),
        size=(
            str | None,
            Field(
                default=None,
                description=f"'WIDTHxHEIGHT' in pixels, each side {sizes}; or 'auto' (the server's default).",
                json_schema_extra={"pattern": size_pattern},
            ),
        ),
        model=(
            str | None,
            Field(
                default=None,
                description="Must name the served model when given.",
                json_schema_extra={"enum": [model_name, None]},
            ),
        ),
        lora=(
            dict[str, LoraWeight] | None,
            Field(
                default=None,
                description="LoRA adapter name -> weight, each in "
                f"[-{MAX_LORA_WEIGHT:g}, {MAX_LORA_WEIGHT:g}]; adapters not named are off, {{}} turns LoRA off. "
                f"Omitted: every loaded adapter ({', '.join(adapters) or 'none'}) at weight 1.0.",
                json_schema_extra=names,
            ),
        ),
    )


class ImageEditRequest(BaseModel):
    """``POST /v1/images/edits`` (multipart: ``image``, optional ``mask``, and these fields)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=COMPRESSION_RULE)

    prompt: str = Field(min_length=1, description="What to make of the image.")
    model: str | None = Field(default=None, description="Must name the served model when given.")
    n: json_int(ge=1, le=MAX_IMAGES_PER_REQUEST) = Field(default=1, description="Number of images.")
    size: str | None = Field(
        default=None,
        description="'WIDTHxHEIGHT', or 'auto': the input image's size (which must then be valid).",
    )
    response_format: Literal["b64_json"] = Field(default="b64_json", description="Only 'b64_json' is served.")
    output_format: OutputFormat = Field(default="png", description="The images' format.")
    output_compression: json_int(ge=0, le=100) | None = Field(
        default=None, description="jpeg and webp only: the quality, 0 to 100 (100, the default, is the best)."
    )
    user: str | None = Field(default=None, description="Accepted for compatibility; ignored.")
    negative_prompt: str | None = Field(default=None, description="What to steer away from.")
    num_inference_steps: json_int(ge=1, le=MAX_STEPS) | None = Field(
        default=None, description="Denoising steps."
    )
    guidance_scale: Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)] | None = None
    strength: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = Field(
        default=None, description="Image-to-image pipelines: how far to move from the input (0 to 1]."
    )
    seed: json_int(ge=0, le=MAX_SEED) | None = Field(default=None, description="Seed of the first image.")
    lora: dict[str, LoraWeight] | None = Field(
        default=None, description="As in generations (JSON text in a form)."
    )


class VideoRequest(BaseModel):
    """``POST /v1/videos`` (JSON, or multipart with an ``input_reference`` image for image-to-video pipelines)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="What to generate.")
    model: str | None = Field(default=None, description="Must name the served model when given.")
    size: str | None = Field(default=None, description="'WIDTHxHEIGHT' in pixels, or 'auto'.")
    seconds: str | Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None,
        description="Length; frames = seconds × fps, rounded to the pipeline's frame granularity. Not with num_frames.",
    )
    num_frames: json_int(ge=1, le=10_000) | None = Field(
        default=None, description="Frames (not with seconds)."
    )
    fps: json_int(ge=1, le=120) | None = Field(default=None, description="Frames per second of the file.")
    output_format: Literal["mp4", "webm", "gif"] = Field(
        default="mp4", description="mp4 (H.264), webm (VP9) or gif."
    )
    negative_prompt: str | None = Field(default=None, description="What to steer away from.")
    num_inference_steps: json_int(ge=1, le=MAX_STEPS) | None = Field(
        default=None, description="Denoising steps."
    )
    guidance_scale: Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)] | None = None
    seed: json_int(ge=0, le=MAX_SEED) | None = Field(default=None, description="Random when omitted.")
    lora: dict[str, LoraWeight] | None = Field(
        default=None, description="As in generations (JSON text in a form)."
    )
    user: str | None = Field(default=None, description="Accepted for compatibility; ignored.")


class VideoError(BaseModel):
    code: str
    message: str
    type: str | None = None


class VideoObject(BaseModel):
    """A video job, as OpenAI's ``Video`` (with ``steps_done``/``steps_total`` and the frame count added)."""

    id: str
    object: Literal["video"] = "video"
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = Field(
        default=None, description="When the finished job and its file are deleted."
    )
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(description="Percent done: denoising steps done over the total (100 once written).")
    steps_done: int
    steps_total: int | None = None
    prompt: str
    seconds: str
    size: str
    num_frames: int
    fps: int
    output_format: str
    error: VideoError | None = None
    remixed_from_video_id: str | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ImageData(BaseModel):
    b64_json: str = Field(description="The image, base64-encoded, in the response's output_format.")
    revised_prompt: str | None = None


class ImageGenerationResponse(BaseModel):
    created: int = Field(description="Unix time of the answer.")
    data: list[ImageData]
    output_format: OutputFormat = "png"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vramferry"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PlanSummary(BaseModel):
    """One planned request shape: what the planner predicts there and where the weights go."""

    size: str
    frames: int
    steps: int
    batch: int = Field(default=1, description="Images per pipeline call.")
    predicted_step_s: float | None = None
    predicted_peak_bytes: int | None = None
    placement: dict[str, str]
    current: bool = False


class PlanList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PlanSummary]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    # Under Ray Serve: the replicas that reported within the last minute (this one included); absent otherwise.
    replicas: list[str] | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict] = {
    400: {"model": ErrorResponse, "description": "Invalid request (the message names the field)."},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key."},
    413: {"model": ErrorResponse, "description": "Request body too large."},
    429: {
        "model": ErrorResponse,
        "description": "The queue is full; retry later.",
        "headers": {
            "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}
        },
    },
    500: {"model": ErrorResponse, "description": "The pipeline failed on this request."},
    503: {
        "model": ErrorResponse,
        "description": "Out of device memory on this request, or the worker stopped.",
    },
    504: {"model": ErrorResponse, "description": "The request did not finish within the server's timeout."},
}
