"""Probe the execution device: host→device bandwidth and allocator settings (CUDA calls live here, not in
the planner)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


_PROBE_BYTES = 256 * 2**20


def measure_h2d_bandwidth(device: torch.device, nbytes: int = _PROBE_BYTES) -> float:
    """Pinned host→device bytes per second (256 MiB copied four times)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)  # calibration only: a clean start for the timer
    reps = 4
    start = time.perf_counter()
    for _ in range(reps):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return nbytes * reps / seconds


def device_profile(device: torch.device, bandwidth: float | None = None):
    """A :class:`~vramferry.planning.devices.DeviceProfile` for ``device``: the preset matching its name, with its
    memory and the host→device ``bandwidth`` (probed here when not given)."""
    from ..planning.devices import profile_from

    name = torch.cuda.get_device_name(device)
    total = torch.cuda.get_device_properties(device).total_memory
    if bandwidth is None:
        bandwidth = measure_h2d_bandwidth(device)
    logger.info("calibrated %s: %.1f GB/s host->device", name, bandwidth / 1e9)
    try:
        profile = profile_from(gpu=name, bandwidth=bandwidth, memory=total)
    except (
        ValueError
    ):  # no preset for this GPU: the default's compute figures, this one's bandwidth and memory
        profile = profile_from(bandwidth=bandwidth, memory=total)
    return dataclasses.replace(profile, expandable_segments=expandable_segments())


def expandable_segments() -> bool:
    """Whether the CUDA caching allocator was configured with expandable segments."""
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        setting = os.environ.get(name, "").replace(" ", "").lower()
        if "expandable_segments:true" in setting:
            return True
    return False
