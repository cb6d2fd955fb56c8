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


def measure_peer_bandwidth(src: torch.device, dst: torch.device, nbytes: int = _PROBE_BYTES) -> float:
    """Device-to-device bytes per second from ``src`` to ``dst`` (256 MiB copied four times on ``src``'s stream)."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=src)
    target = torch.empty(nbytes, dtype=torch.uint8, device=dst)
    target.copy_(source)
    torch.cuda.synchronize(src)  # calibration only: a clean start for the timer
    torch.cuda.synchronize(dst)
    reps = 4
    start = time.perf_counter()
    for _ in range(reps):
        target.copy_(source, non_blocking=True)
    torch.cuda.synchronize(src)
    torch.cuda.synchronize(dst)
    return nbytes * reps / (time.perf_counter() - start)


def helper_links(device: torch.device, helpers: tuple[str, ...]) -> list[tuple[torch.device, bool, float]]:
    """Each helper GPU with whether it is another device than ``device`` and the rate its link adds to a
    streamed block: the lesser of its host→device and its peer bandwidth to ``device`` (measured here)."""
    from ..errors import DeviceError

    count = torch.cuda.device_count()
    found = []
    for name in helpers:
        helper = torch.device(name)
        if helper.index >= count:
            raise DeviceError(
                f"helper_devices: {name} does not exist: this machine has {count} CUDA device(s) "
                f"(cuda:0..cuda:{count - 1}); name only devices it has"
            )
        if helper.index == device.index:
            logger.info("helper %s is the execution device itself: it adds no link (the helper path still runs)", name)
            found.append((helper, False, 0.0))
            continue
        own = measure_h2d_bandwidth(helper)
        peer = measure_peer_bandwidth(helper, device)
        logger.info("calibrated helper %s: %.1f GB/s host->device, %.1f GB/s to %s", name, own / 1e9, peer / 1e9, device)
        found.append((helper, True, min(own, peer)))
    return found


_DECODE_PROBE_BYTES = 64 * 2**20


def measure_decode_speed(codec, device: torch.device, nbytes: int = _DECODE_PROBE_BYTES) -> float:
    """Bytes of output per second ``codec`` decodes on ``device``, on a stream of its own as the runtime runs it:
    64 MiB of N(0, 0.02) bf16 values (what trained weights look like to an entropy coder), encoded in the host
    store's chunks, each chunk decoded from a device buffer of its own, best of three."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    values = torch.randn(nbytes // 2, generator=generator) * 0.02
    raw = values.to(torch.bfloat16).view(torch.uint8)
    encoded = codec.encode(raw)
    payload = encoded.payload.to(device)
    sources = [payload[c.start : c.start + c.length].clone() for c in encoded.chunks]
    out = torch.empty(raw.numel(), dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    best = float("inf")
    for _ in range(3):
        stream.synchronize()  # calibration only: a clean start for the timer
        start = time.perf_counter()
        keep = [
            codec.decode_on(src, out[c.raw_start : c.raw_start + c.raw_len], stream)
            for c, src in zip(encoded.chunks, sources, strict=True)
        ]
        stream.synchronize()
        best = min(best, time.perf_counter() - start)
        del keep
    return raw.numel() / best


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
