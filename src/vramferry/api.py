"""The public verb: ``apply(pipeline, config) -> OffloadHandle``. (Runtime under construction.)"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class OffloadStats:
    """Counters since ``apply`` (or the last ``reset``).

    Attributes:
        mode: the configured mode.
        bytes_h2d, bytes_d2h: weight bytes copied host→device and device→host (the latter stays 0 by design).
        copy_seconds: time the copy engine spent on weight copies (measured with events on CUDA).
        h2d_gbps: achieved host→device bandwidth, GB/s (1e9 bytes).
        wait_seconds: time compute waited for weights that were not ready yet.
        swaps: component onloads.
        blocks_streamed: block copies made by layerwise streaming.
        sync_loads: loads that were not prefetched (out-of-order or skipped blocks, first use).
        peak_allocated, peak_reserved: device memory peaks in bytes (``torch.cuda``), 0 on CPU.
        host_pinned_bytes, host_pageable_bytes: where the canonical host copies live.
    """

    mode: str = "none"
    bytes_h2d: int = 0
    bytes_d2h: int = 0
    copy_seconds: float = 0.0
    h2d_gbps: float = 0.0
    wait_seconds: float = 0.0
    swaps: int = 0
    blocks_streamed: int = 0
    sync_loads: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    host_pinned_bytes: int = 0
    host_pageable_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
