"""``load(model, config) -> OffloadHandle``: a pipeline from its folder or Hub id, straight into the host store."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .api import OffloadHandle, apply
from .config import OffloadConfig
from .planning.calibrate import Measurements

logger = logging.getLogger(__name__)


def load(
    model: str | os.PathLike | None,
    config: OffloadConfig | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    variant: str | None = None,
    progress: bool | None = None,
    workload: Any = None,
    prepare: Callable[[Any], Any] | None = None,
    **changes: Any,
) -> OffloadHandle:
    """Load a diffusers pipeline and offload it, its weights read from the checkpoint files into the host store.

    diffusers builds the pipeline's modules on the meta device and binds each weight to a memory-mapped view of
    its safetensors file that touches no page (diffusers' and transformers' readers are handed such views while
    it builds them), while the kernel is asked to start reading a local folder's files (when they fit in the
    available memory) and, on a GPU, CUDA starts (:func:`build_pipeline`). The host store is then filled straight
    from the files, with large reads on several threads, at the disk's speed: the weights are never copied in
    memory on the way, and the mapped file pages never count in the process's memory. Weights converted on
    loading (a ``dtype`` other than the files') are copied from memory instead.

    Args:
        model: a local folder written by ``save_pretrained`` (with ``model_index.json``), a Hugging Face Hub id
            (downloaded to, or read from, the Hub cache), or ``None`` for the built-in demo pipeline.
        config: what to do (:class:`~vramferry.OffloadConfig`); defaults to auto mode.
        dtype: the weights' dtype (``"bfloat16"``...); ``None`` keeps diffusers' default.
        variant: the weight-file variant to load (``"fp16"``).
        progress: show a progress bar (bytes, GB/s) while the store fills; ``None``: only when vramferry logs
            at INFO level.
        workload: the request shape the plan is sized for (see :func:`~vramferry.apply`).
        prepare: called with the pipeline once its modules are built, before its weights are packed: load LoRA
            adapters, check what it can make. An exception it raises ends the load.
        **changes: field overrides applied to a copy of ``config`` (``mode="layerwise"``).

    Returns:
        The :class:`~vramferry.OffloadHandle`; ``handle.pipeline`` is the pipeline, ready to call.

    Raises:
        LoadError: the folder or id cannot be loaded (the message names it and the fix).
        OffloadError: see :func:`~vramferry.apply`.
    """
    start = time.perf_counter()
    wanted = (config or OffloadConfig()).replace(**changes)
    pipeline, measured = build_pipeline(model, wanted, dtype=dtype, variant=variant)
    if prepare is not None:
        prepare(pipeline)
    built = time.perf_counter()
    handle = apply(pipeline, wanted, workload=workload, progress=progress, measured=measured)
    logger.info(
        "vramferry: %s loaded in %.2f s (modules %.2f s, host store and device %.2f s)",
        type(pipeline).__name__,
        time.perf_counter() - start,
        built - start,
        time.perf_counter() - built,
    )
    return handle


def build_pipeline(
    model: str | os.PathLike | None,
    config: OffloadConfig | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    variant: str | None = None,
) -> tuple[Any, Measurements | None]:
    """``model``'s pipeline on the CPU, built without reading its weights: each is a view of its safetensors file
    that touches no page, read when something uses it (the host store reads them all, in order, once).

    With the ``config`` it is about to be offloaded with, the disk and the GPU start meanwhile: the kernel is asked
    to read a local folder's files ahead (with a compressed cache, its files and the checkpoint files it does not
    cover), and for a CUDA device a thread creates the CUDA context and measures the host→device link. Without
    one (to plan, to inspect), nothing is read ahead and CUDA is left alone.

    Returns:
        The pipeline, and the link's measurement for ``apply(..., measured=...)`` (``None`` without a GPU).

    Raises:
        LoadError: see :func:`load`.
    """
    from .pipelines.loading import load_pipeline
    from .runtime.cache import prefetch_paths
    from .runtime.files import prefetch, untouched_safetensors

    device = _DeviceStart(config) if config is not None else None
    if config is not None and model is not None and Path(model).expanduser().is_dir():
        folder = Path(model).expanduser()
        paths = None
        if str(config.compression) != "off":
            paths = prefetch_paths(folder, config.compression_cache, config.device.type)
        prefetch(paths if paths is not None else [str(p) for p in sorted(folder.rglob("*.safetensors"))])
    try:
        with untouched_safetensors():
            pipeline = load_pipeline(model, dtype=dtype, variant=variant)
    finally:
        measured = device.result() if device is not None else None
    return pipeline, measured


class _DeviceStart:
    """On a GPU, a thread that creates the CUDA context and measures the host→device bandwidth, handed to
    :func:`~vramferry.apply` as its measurement (:meth:`result`). Nothing runs on the CPU or where CUDA is
    missing, and a failure is left for ``apply`` to report in its own words."""

    def __init__(self, config: OffloadConfig) -> None:
        self._measured: Measurements | None = None
        self._thread: threading.Thread | None = None
        if config.device.type == "cuda" and torch.cuda.is_available():
            self._thread = threading.Thread(
                target=self._run, args=(config,), name="vramferry-device-start", daemon=True
            )
            self._thread.start()

    def _run(self, config: OffloadConfig) -> None:
        from .compat import resolve_device
        from .runtime.probe import measure_h2d_bandwidth

        try:
            device = resolve_device(config)
            rate = measure_h2d_bandwidth(device)
            torch.cuda.empty_cache()  # the probe's buffer must not count against the free memory apply reads
            self._measured = Measurements(h2d_bytes_per_s={torch.cuda.get_device_name(device): rate})
        except Exception:  # apply meets the same problem and says what it is
            self._measured = None

    def result(self) -> Measurements | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self._measured
