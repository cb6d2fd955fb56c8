"""Several image requests in one pipeline call: which requests may share a call, how many images a call may
make, and the call itself.

Under offload a denoising step costs about the larger of its compute and the weight bytes streamed over the
bus, and the bytes do not grow with the batch: a call of several images costs little more than one until
compute overtakes the transfers (:mod:`vramferry.planning.throughput`). Requests share a call when every call
argument but the prompts and the seeds is the same; each image keeps its own ``torch.Generator``, so its initial
noise is the one it has alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .generation import GenerationParams, StepCallback, call_arguments, call_parameters, outputs_of

logger = logging.getLogger(__name__)


def batch_key(params: GenerationParams) -> tuple | None:
    """What requests sharing a call with ``params`` must have in common; ``None`` when it cannot share one.

    Prompts, negative prompts and seeds may differ, but not whether a negative prompt is given (diffusers
    pipelines such as Flux turn true classifier-free guidance on for the whole call when it is). Edits (an input
    image) and videos run alone (the worker also runs every call of a video pipeline alone).
    """
    if params.image is not None or params.mask is not None or params.frames is not None:
        return None
    return (
        params.width,
        params.height,
        params.steps,
        params.guidance,
        params.strength,
        params.negative_prompt is None,
        None if params.lora is None else tuple(sorted(params.lora.items())),
        repr(sorted(params.extra.items())),  # repr: the values need not be hashable
    )


def planned_batch(handle: Any, workload: Any, max_batch: int) -> int:
    """The most images per call for ``workload``'s shape: on a GPU, the largest batch whose predicted peak fits
    the handle's budget and whose predicted images per second still rise
    (:func:`~vramferry.planning.throughput.best_batch`), at most ``max_batch``; ``max_batch`` where nothing
    predicts for this device (no offload handle, or the CPU, where the plan's times describe a GPU preset)."""
    if max_batch <= 1:
        return 1
    prepare = getattr(handle, "prepare", None)
    if workload is None or not callable(prepare) or getattr(handle, "device", None) is None:
        return max_batch
    if getattr(handle.device, "type", None) != "cuda":
        return max_batch
    from ..planning.throughput import best_batch, throughput

    one = dataclasses.replace(workload, batch=1)
    try:
        # prepare() caches each plan in the handle: replanning to a batch size later reuses it.
        return min(max_batch, best_batch(throughput(lambda work: prepare([work])[0], one, max_batch)))
    except Exception:  # a shape the planner cannot price is served, one request per call
        logger.warning("could not plan batches for %s; serving it one request per call", one, exc_info=True)
        return 1


def batch_arguments(
    pipeline: Any, batch: Sequence[GenerationParams], on_step: StepCallback | None = None
) -> dict[str, Any]:
    """The keyword arguments of one call for every request of ``batch`` (same :func:`batch_key`): a list of
    prompts with one entry per image (a request of ``n`` images repeats its prompt ``n`` times, as
    ``num_images_per_prompt`` does) and one generator per image, seeded as the request alone seeds it."""
    kwargs = call_arguments(pipeline, batch[0], on_step)
    accepted = call_parameters(pipeline)
    kwargs["prompt"] = [params.prompt for params in batch for _ in range(params.n)]
    if batch[0].negative_prompt is not None:
        kwargs["negative_prompt"] = [params.negative_prompt for params in batch for _ in range(params.n)]
    if "num_images_per_prompt" in accepted:
        kwargs["num_images_per_prompt"] = 1
    if "generator" in accepted:
        kwargs["generator"] = [_generator(params.seed, i) for params in batch for i in range(params.n)]
    return kwargs


def _generator(seed: int | None, index: int) -> torch.Generator:
    """Image ``index``'s generator, as :func:`~vramferry.server.generation.call_arguments` makes it alone; a
    request without a seed gets a random one (the pipeline's global generator would be shared by the batch)."""
    generator = torch.Generator("cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed + index)
    return generator


def generate_batch(
    pipeline: Any, batch: Sequence[GenerationParams], on_step: StepCallback | None = None
) -> list[list[Any]]:
    """Run ``batch`` as one call; returns each request's outputs (one PIL image per image it asked for).

    Raises:
        RuntimeError: the pipeline returned another number of images than the batch asked for.
    """
    kwargs = batch_arguments(pipeline, batch, on_step)
    logger.debug("calling %s for %d requests at once", type(pipeline).__name__, len(batch))
    with torch.no_grad():
        outputs = outputs_of(pipeline(**kwargs))
    return split(outputs, [params.n for params in batch])


def split(outputs: list[Any], counts: Sequence[int]) -> list[list[Any]]:
    """``outputs`` cut into consecutive pieces of ``counts`` items."""
    if len(outputs) != sum(counts):
        raise RuntimeError(f"the pipeline made {len(outputs)} images for a batch of {sum(counts)}")
    pieces, start = [], 0
    for count in counts:
        pieces.append(outputs[start : start + count])
        start += count
    return pieces


def take_company(
    waiting: Any, key: tuple, images: int, cap: int, compatible: Callable[[Any], tuple | None]
) -> list[Any]:
    """Remove from ``waiting`` (queue order) the jobs of ``key`` that fit in ``cap - images`` more images, and
    return them. ``compatible(job)``: the job's key, or ``None`` for a job that must run alone."""
    taken = []
    for job in list(waiting):
        if images >= cap:
            break
        if job.params.n <= cap - images and compatible(job) == key:
            waiting.remove(job)
            taken.append(job)
            images += job.params.n
    return taken
