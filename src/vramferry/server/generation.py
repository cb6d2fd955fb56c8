"""One call of a pipeline from plain parameters, and its outputs as files or PNG bytes.

Shared by ``vramferry generate``, ``vramferry bench`` and the server's worker.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .media import DEFAULT_FPS, VIDEO_SUFFIXES, encode_image, write_video

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with ``(step index, total steps)``; may raise to abort the run."""


@dataclass(frozen=True)
class GenerationParams:
    """What to generate. ``None`` leaves a value to the pipeline's own default.

    Attributes:
        prompt, negative_prompt: the text conditions.
        steps: denoising steps (``num_inference_steps``).
        width, height: the output size in pixels.
        guidance: ``guidance_scale``.
        seed: the first image's seed; image ``i`` of a call uses ``seed + i`` so each image differs.
        n: images per call (``num_images_per_prompt``).
        frames: ``num_frames`` for video pipelines.
        extra: further keyword arguments for the pipeline (``max_sequence_length``); those it does not take are
            left out.
        lora: the LoRA adapters' weights for this call (name → weight; ``{}``: LoRA off), which the server's
            worker sets before the call; ``None`` leaves the pipeline's adapters as they are.
        image, mask: an input image (a PIL image) for image-to-image, edit and image-to-video pipelines, and the
            mask of an inpainting pipeline (``mask_image``).
        strength: how far an image-to-image pipeline moves away from its input (0 to 1).
    """

    prompt: str
    negative_prompt: str | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    seed: int | None = None
    n: int = 1
    frames: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    lora: Mapping[str, float] | None = None
    image: Any = None
    mask: Any = None
    strength: float | None = None


_ARGUMENTS = {
    "negative_prompt": "negative_prompt",
    "steps": "num_inference_steps",
    "width": "width",
    "height": "height",
    "guidance": "guidance_scale",
    "frames": "num_frames",
    "image": "image",
    "mask": "mask_image",
    "strength": "strength",
}


def call_parameters(pipeline: Any) -> set[str]:
    """The keyword arguments ``pipeline.__call__`` accepts (the class ``verify=True`` swaps in keeps the
    signature, through ``functools.wraps``)."""
    try:
        return set(inspect.signature(pipeline).parameters)
    except (TypeError, ValueError):
        return set()


def size_multiple(pipeline: Any) -> int:
    """What image sides must be a multiple of: twice the VAE's scale factor (latents are packed 2×2), or 16."""
    factor = getattr(pipeline, "vae_scale_factor", None)
    if isinstance(factor, int) and factor > 0:
        return 2 * factor
    spatial = getattr(pipeline, "vae_scale_factor_spatial", None)
    if isinstance(spatial, int) and spatial > 0:
        return 2 * spatial
    return 16


def is_video_pipeline(pipeline: Any) -> bool:
    return "num_frames" in call_parameters(pipeline)


def unsupported(pipeline: Any, params: GenerationParams) -> list[str]:
    """The ``GenerationParams`` fields that are set but that ``pipeline`` does not take."""
    accepted = call_parameters(pipeline)
    missing = [
        name for name, arg in _ARGUMENTS.items() if getattr(params, name) is not None and arg not in accepted
    ]
    if params.n > 1 and "num_images_per_prompt" not in accepted:
        missing.append("n")
    return missing


def call_arguments(
    pipeline: Any, params: GenerationParams, on_step: StepCallback | None = None
) -> dict[str, Any]:
    """The keyword arguments for ``pipeline(**kwargs)``.

    Raises:
        ValueError: a set parameter that the pipeline does not take, naming it.
    """
    missing = unsupported(pipeline, params)
    if missing:
        raise ValueError(f"{type(pipeline).__name__} does not take {', '.join(missing)}")
    accepted = call_parameters(pipeline)
    kwargs: dict[str, Any] = {"prompt": params.prompt}
    for name, arg in _ARGUMENTS.items():
        value = getattr(params, name)
        if value is not None:
            kwargs[arg] = value
    kwargs.update({key: value for key, value in params.extra.items() if key in accepted})
    if "num_images_per_prompt" in accepted:
        kwargs["num_images_per_prompt"] = params.n
    if params.seed is not None and "generator" in accepted:
        # CPU generators give the same noise whatever the execution device; one per image so each differs.
        kwargs["generator"] = [torch.Generator("cpu").manual_seed(params.seed + i) for i in range(params.n)]
    if "output_type" in accepted:
        kwargs["output_type"] = "pil"
    if on_step is not None and "callback_on_step_end" in accepted:
        total = params.steps

        def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(step + 1, total if total is not None else getattr(pipe, "num_timesteps", step + 1))
            return tensors

        kwargs["callback_on_step_end"] = callback
    return kwargs


def _to_pil(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else image
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.dtype != "uint8":
        array = (array.clip(0, 1) * 255).round().astype("uint8")
    return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)


def outputs_of(result: Any) -> list[Any]:
    """A pipeline result as a list with one entry per generated item: a PIL image, or a list of frames."""
    if hasattr(result, "images"):
        return [_to_pil(image) for image in result.images]
    if hasattr(result, "frames"):
        return [[_to_pil(frame) for frame in video] for video in result.frames]
    if isinstance(result, tuple) and result:
        return outputs_of(type("Output", (), {"images": result[0]})())
    raise TypeError(f"cannot find images or frames in a pipeline result of type {type(result).__name__}")


def generate(pipeline: Any, params: GenerationParams, on_step: StepCallback | None = None) -> list[Any]:
    """Run ``pipeline`` once for ``params``; returns one PIL image (or list of frames) per output.

    ``on_step`` is called after every denoising step where the pipeline supports ``callback_on_step_end``; an
    exception it raises aborts the run.
    """
    kwargs = call_arguments(pipeline, params, on_step)
    logger.debug("calling %s with %s", type(pipeline).__name__, sorted(kwargs))
    with torch.no_grad():
        result = pipeline(**kwargs)
    return outputs_of(result)


def png_bytes(image: Any) -> bytes:
    """``image`` (a PIL image) encoded as PNG."""
    return encode_image(image, "png")


def disable_progress_bar(pipeline: Any) -> None:
    """Silence a diffusers pipeline's own progress bar, where it has one."""
    configure = getattr(pipeline, "set_progress_bar_config", None)
    if callable(configure):
        configure(disable=True)


def save_outputs(outputs: list[Any], out: Path, fps: int = DEFAULT_FPS) -> list[Path]:
    """Write images (``out`` as given, numbered when several) or videos: ``.mp4`` (H.264), ``.webm`` (VP9) or
    ``.gif`` at ``fps`` frames per second; any other suffix writes one PNG per frame."""
    out.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for index, item in enumerate(outputs):
        target = out if len(outputs) == 1 else out.with_name(f"{out.stem}_{index}{out.suffix}")
        if isinstance(item, list):
            written += _save_video(item, target, fps)
        else:
            item.save(target)
            written.append(target)
    return written


def _save_video(frames: list[Any], target: Path, fps: int) -> list[Path]:
    video_format = VIDEO_SUFFIXES.get(target.suffix.lower())
    if video_format is not None:
        return [write_video(frames, target, video_format, fps)]
    paths = [target.with_name(f"{target.stem}_{i:04d}.png") for i in range(len(frames))]
    for frame, path in zip(frames, paths, strict=True):
        frame.save(path)
    return paths


def request_workload(params: GenerationParams, batch: int | None = None) -> Any:
    """The cost model's ``Workload`` for one request, from what the request fixes; ``batch``: the images of the
    call it runs in (default: the request's own ``n``)."""
    shape = {
        "height": params.height,
        "width": params.width,
        "num_frames": params.frames,
        "steps": params.steps,
    }
    shape = {key: value for key, value in shape.items() if value is not None}
    if not shape:
        return None
    from ..planning.workload import Workload

    return Workload(batch=params.n if batch is None else batch, **shape)
