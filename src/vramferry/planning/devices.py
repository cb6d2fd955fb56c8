"""Device profiles: what the cost model knows about a GPU (memory, host→device bandwidth, compute, launch
floors), as presets for common cards or built from measured figures."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..units import parse_bandwidth, parse_bytes

GiB = 2**30


@dataclass(frozen=True)
class DeviceProfile:
    """What the cost model needs to know about a device.

    Attributes:
        name: a preset name or ``"custom"``.
        memory_bytes: device memory in bytes.
        h2d_bytes_per_s: achieved host→device bandwidth from pinned memory, bytes per second.
        flops_per_s: achieved bf16 FLOP/s of a DiT's linear layers.
        per_block_overhead_s: compute-stream time lost per streamed block and call (event wait, hand-over).
        attention_flops_per_s: achieved FLOP/s of attention; ``None``: ``flops_per_s`` × 1.36, the H100 ratio.
        memory_bytes_per_s: achieved device-memory bandwidth (for elementwise work).
        expandable_segments: the CUDA caching allocator grows segments in place
            (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``), so less memory sits reserved but unused.
        block_floor_s: the least time a block takes, set by the host launching its kernels.
        copy_contention: fractional compute slowdown while weight copies run beside it.
        decode_bytes_per_s: lossless decode speed on the device, bytes of output per second; ``None``: 5 % of
            ``memory_bytes_per_s`` (nvCOMP ANS measured 231 GB/s on an H200, whose preset gives 216).
        decode_contention: fraction of a decode's time that the compute stream loses while it runs beside it.
        replacing: plans for a handle that re-places its weights on the device (between request shapes): the
            allocator then keeps more cached (:data:`~vramferry.planning.costmodel.REPLACED_SLACK_CAP`).
        pageable_bytes_per_s: host→device bandwidth from pageable memory (pieces left mapped in their checkpoint
            files); ``None``: 15 % of ``h2d_bytes_per_s`` (an H200 measured 8.0 against 55 GB/s pinned).
        helper_bytes_per_s: per helper GPU (:attr:`~vramferry.config.OffloadConfig.helper_devices`), the rate at
            which its link adds bytes to a streamed block: the lesser of its own host→device bandwidth and its
            peer bandwidth to this device (0 for a helper that is this device).
    """

    name: str
    memory_bytes: int
    h2d_bytes_per_s: float
    flops_per_s: float
    per_block_overhead_s: float = 2.0e-4
    attention_flops_per_s: float | None = None
    memory_bytes_per_s: float = 3.0e12
    block_floor_s: float = 1.5e-3
    copy_contention: float = 0.015
    expandable_segments: bool = False
    decode_bytes_per_s: float | None = None
    decode_contention: float = 0.3
    replacing: bool = False
    pageable_bytes_per_s: float | None = None
    helper_bytes_per_s: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.attention_flops_per_s is None:
            object.__setattr__(self, "attention_flops_per_s", _ATTENTION_RATIO * self.flops_per_s)
        if self.decode_bytes_per_s is None:
            object.__setattr__(self, "decode_bytes_per_s", _DECODE_FRACTION * self.memory_bytes_per_s)
        if self.pageable_bytes_per_s is None:
            object.__setattr__(self, "pageable_bytes_per_s", _PAGEABLE_FRACTION * self.h2d_bytes_per_s)
        for name in (
            "memory_bytes",
            "h2d_bytes_per_s",
            "flops_per_s",
            "attention_flops_per_s",
            "memory_bytes_per_s",
            "decode_bytes_per_s",
            "pageable_bytes_per_s",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: must be a positive number, got {value!r}")
        object.__setattr__(self, "helper_bytes_per_s", tuple(self.helper_bytes_per_s))
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in self.helper_bytes_per_s):
            raise ValueError(f"helper_bytes_per_s: must be numbers ≥ 0, got {self.helper_bytes_per_s!r}")
        for name in ("per_block_overhead_s", "block_floor_s", "copy_contention", "decode_contention"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name}: must be a number ≥ 0, got {value!r}")

    @property
    def stream_bytes_per_s(self) -> float:
        """The rate at which a raw streamed block crosses: this device's link plus its helpers'."""
        return self.h2d_bytes_per_s + sum(self.helper_bytes_per_s)

    @property
    def tokens_for_free_streaming(self) -> float:
        """T* ≈ F / B: tokens per call above which a bf16 linear block hides its own copy (peers.md §C)."""
        return self.flops_per_s / self.h2d_bytes_per_s


# Achieved linear-layer and attention FLOP/s as fractions of the dense bf16 tensor-core peak, fitted on the
# H100 (see the module docstring: 465 and 632 TFLOP/s of 989); other devices are assumed to reach the same
# fractions of their peak, and ~90 % of their memory bandwidth.
_LINEAR_FRACTION, _ATTENTION_RATIO = 0.47, 1.36
# Entropy decoding is bound by device memory: nvCOMP ANS decoded at 231 GB/s on an H200 (4.8 TB/s peak), about
# 5 % of the achieved memory bandwidth; other devices are assumed to reach the same fraction.
_DECODE_FRACTION = 0.05

# Pageable copies against pinned ones (H200, PCIe Gen5: 7.7-8.4 GB/s against 54.9 GB/s, docs/benchmarks.md).
_PAGEABLE_FRACTION = 0.15


def _preset(name: str, memory: int, h2d: float, peak_flops: float, memory_bandwidth: float) -> DeviceProfile:
    flops = _LINEAR_FRACTION * peak_flops
    return DeviceProfile(name, memory, h2d, flops, memory_bytes_per_s=0.9 * memory_bandwidth)


PRESETS: dict[str, DeviceProfile] = {
    # H100 80GB HBM3 (SXM), PCIe Gen5 x16: pinned H2D 55.2 GB/s measured (anchor_flux_h100.json).
    "h100": _preset("h100", 80 * GiB, 55.2e9, 989e12, 3.35e12),
    # H200 141 GB, PCIe Gen5 x16: the H100's compute die; ~55 GB/s pinned assumed (line rate ~64 GB/s).
    "h200": _preset("h200", 140 * GiB, 55.0e9, 989e12, 4.8e12),
    # A100 80GB, PCIe Gen4 x16: ~25 GB/s pinned.
    "a100": _preset("a100", 80 * GiB, 25.0e9, 312e12, 2.0e12),
    # L40S 48 GB, PCIe Gen4 x16: ~25 GB/s pinned.
    "l40s": _preset("l40s", 46068 * 2**20, 25.0e9, 362e12, 0.864e12),
    # RTX 4090 24 GB, PCIe Gen4 x16: 24.7 GB/s pinned (third-party measurement, peers.md §C).
    "rtx4090": _preset("rtx4090", 24 * GiB, 24.7e9, 165e12, 1.008e12),
    # RTX 3090 24 GB, PCIe Gen4 x16: ~24 GB/s pinned assumed.
    "rtx3090": _preset("rtx3090", 24 * GiB, 24.0e9, 71e12, 0.936e12),
}
DEFAULT_PROFILE = "h100"
# Substrings of a device name (``torch.cuda.get_device_name()``) that select a preset, most specific first.
_NAME_HINTS = (
    ("h200", "h200"),
    ("h100", "h100"),
    ("a100", "a100"),
    ("l40s", "l40s"),
    ("4090", "rtx4090"),
    ("3090", "rtx3090"),
)


def _preset_for(gpu: str) -> DeviceProfile:
    key = re.sub(r"[\s_-]+", "", gpu.strip().lower())
    if key in PRESETS:
        return PRESETS[key]
    for hint, preset in _NAME_HINTS:
        if hint in key:
            return PRESETS[preset]
    raise ValueError(
        f"gpu: no preset matches {gpu!r}; valid presets: {', '.join(PRESETS)} (a device name such as "
        f"'NVIDIA H100 80GB HBM3' also works), or give bandwidth=, tflops= and memory= for a custom profile"
    )


def profile_from(
    gpu: str | None = None,
    bandwidth: float | str | None = None,
    tflops: float | None = None,
    memory: int | str | None = None,
) -> DeviceProfile:
    """A :class:`DeviceProfile` from a preset or a device name, with measured figures overriding it.

    Args:
        gpu: a preset name (``"h100"``, ``"rtx4090"``, ...) or a device name (``"NVIDIA H100 80GB HBM3"``).
            ``None`` starts from the ``h100`` preset.
        bandwidth: achieved pinned host→device bandwidth, ``"25GB/s"`` or bytes per second.
        tflops: achieved bf16 TFLOP/s.
        memory: device memory, ``"24GiB"`` or bytes.

    Raises:
        ValueError: an unknown ``gpu`` (the message lists the presets) or a non-positive figure.
    """
    base = PRESETS[DEFAULT_PROFILE] if gpu is None else _preset_for(gpu)
    changes: dict[str, object] = {}
    if bandwidth is not None:
        changes["h2d_bytes_per_s"] = parse_bandwidth(bandwidth, what="bandwidth")
    if tflops is not None:
        if isinstance(tflops, bool) or not isinstance(tflops, (int, float)) or tflops <= 0:
            raise ValueError(f"tflops: must be a positive number of TFLOP/s, got {tflops!r}")
        changes["flops_per_s"] = float(tflops) * 1e12
        changes["attention_flops_per_s"] = None  # follows flops_per_s
    if memory is not None:
        changes["memory_bytes"] = parse_bytes(memory, what="memory")
        if changes["memory_bytes"] <= 0:
            raise ValueError(f"memory: must be positive, got {memory!r}")
    if changes:
        changes["name"] = f"{base.name} (custom)" if gpu is not None else "custom"
        return replace(base, **changes)
    return base
