"""From a validated request body to :class:`GenerationParams`: what depends on the settings and the pipeline."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Any

from .answers import APIError, invalid
from .generation import GenerationParams, unsupported
from .lora import check_lora_weights
from .schemas import NOT_BLANK
from .settings import ServerSettings

_SIZE = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")  # used with fullmatch: ASCII digits, nothing after
_NOT_BLANK = re.compile(NOT_BLANK)
_NAMES = {
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "frames": "num_frames",
    "mask": "mask",
}


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
    body: Any,
    settings: ServerSettings,
    pipeline: Any,
    multiple: int,
    adapters: tuple[str, ...] = (),
    **given: Any,
) -> GenerationParams:
    """Check what depends on the settings and the pipeline, and fill in defaults.

    Args:
        body: a validated request (images, edits or videos: ``prompt``, ``model``, ``size``, ...).
        adapters: the LoRA adapters loaded (a request without ``lora`` uses them all at weight 1.0).
        given: further :class:`GenerationParams` fields (``frames``, ``image``, ...); ``size``, when given,
            replaces the body's (an edit's input size).
    """
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
    size = given.pop("size", size)
    params = GenerationParams(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        steps=body.num_inference_steps if body.num_inference_steps is not None else settings.default_steps,
        width=size[0] if size else None,
        height=size[1] if size else None,
        guidance=body.guidance_scale if body.guidance_scale is not None else settings.default_guidance,
        seed=body.seed if body.seed is not None else secrets.randbits(32),
        n=getattr(body, "n", 1),
        extra=dict(settings.call_defaults),
        lora=_lora_weights(body.lora, adapters),
        **given,
    )
    missing = unsupported(pipeline, params)
    if missing:
        param = _NAMES.get(missing[0], missing[0])
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
