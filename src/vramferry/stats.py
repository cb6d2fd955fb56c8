"""What a live offload reports: :class:`OffloadStats` (``handle.stats()``) and :class:`UnitInfo` (``handle.units()``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class OffloadStats:
    """Counters since ``apply`` (or the last ``reset``).

    Attributes:
        mode: the configured mode.
        bytes_h2d, bytes_d2h: weight bytes copied host→device and device→host (the latter stays 0 by design,
            unless tensors changed while live were packed again from their device copies: see
            :meth:`OffloadHandle.refresh`).
        copy_seconds: time the copy engine spent on weight copies (measured with events on CUDA).
        h2d_gbps: achieved host→device bandwidth, GB/s (1e9 bytes).
        wait_seconds: time compute waited for weights that were not ready yet.
        swaps: component onloads.
        blocks_streamed: block copies made by layerwise streaming.
        sync_loads: loads that were not prefetched (out-of-order or skipped blocks, first use).
        unplanned_phases: phases that began out of the plan's order (their loads were synchronous; a warning
            says how to give the order).
        peak_allocated, peak_reserved: device memory peaks in bytes (``torch.cuda``), 0 on CPU.
        host_pinned_bytes, host_pageable_bytes: where the canonical host copies live.
        apply_seconds: where ``apply`` spent its time: discovery, the device's bandwidth probe, the codec's
            choice, the decode probe, planning (sampling the weights' compressibility where a plan would move
            weights), the host store (filling it and page-locking it, within), device loads and hooks.
        link_bytes: with ``helper_devices``, the bytes copied into streaming slots over each link: the execution
            device's own, then each helper's; empty without helpers.
        host_mapped_bytes: bytes left as views of their checkpoint files (``host_memory_limit`` below the
            weights): in the page cache, not copied into the host store; copied to the device from pageable memory.
        host_shared_bytes: bytes of the host store in shared memory (``share_host_store``), counted in
            ``host_pinned_bytes`` or ``host_pageable_bytes`` too; host_shared_found_bytes: of which another process
            had already read from the checkpoint files (this one read none of them).
        host_compressed_bytes, host_compressed_raw_bytes: the compressed pieces' bytes in host memory, and what
            they decode to (0 without compression); ``bytes_decoded``: bytes decoded on the way in.
        compressed_from_cache, compressed_at_apply: compressed pieces (blocks, non-block parts) whose bytes were
            read from the compressed cache (``vramferry compress``), and those compressed at ``apply``.
        repacked_bytes, repacked_pieces: bytes and pieces (blocks, non-block parts) packed into the host store
            again because their tensors changed while the handle was live (adapters added, deleted, fused or
            unfused; see :meth:`OffloadHandle.refresh`).
        host_file_bytes: bytes of the host store read straight from checkpoint files when it was filled (the
            rest was copied from memory); host_fill_seconds: the time filling it took.
        loaded_while_filling_bytes: resident bytes whose copy to the device started while the host store was
            still filling (each component's as soon as its arena was page-locked), out of ``bytes_h2d``.
        dit_calls, dit_call_seconds: DiT forwards run, and their mean duration (GPU time on CUDA).
        predicted_step_seconds: the plan's predicted denoising step, to compare with the measured calls.
        block_seconds: per DiT, the measured compute seconds of all its blocks in one call (the sum of the
            per-block times measured during its first calls; see :meth:`OffloadHandle.block_times`).
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
    unplanned_phases: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    host_pinned_bytes: int = 0
    host_pageable_bytes: int = 0
    host_mapped_bytes: int = 0
    host_shared_bytes: int = 0
    host_shared_found_bytes: int = 0
    apply_seconds: dict[str, float] = field(default_factory=dict)
    link_bytes: tuple[int, ...] = ()
    host_compressed_bytes: int = 0
    host_compressed_raw_bytes: int = 0
    bytes_decoded: int = 0
    compressed_from_cache: int = 0
    compressed_at_apply: int = 0
    repacked_bytes: int = 0
    repacked_pieces: int = 0
    host_file_bytes: int = 0
    host_fill_seconds: float = 0.0
    loaded_while_filling_bytes: int = 0
    dit_calls: int = 0
    dit_call_seconds: float = 0.0
    predicted_step_seconds: float | None = None
    block_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UnitInfo:
    """One unit of the host store: what moves to the device as one copy.

    Attributes:
        name: ``"<component>:resident"``, ``"<component>:swap"``, ``"<component>.<block path>"`` (a streamed
            block) or ``"shared"`` (tensors reached from several units, kept on the device).
        component: the component it belongs to (``""`` for ``"shared"``).
        kind: ``"resident"``, ``"swap"``, ``"block"`` (streamed) or ``"shared"``.
        nbytes: its packed size (each tensor aligned to 512 bytes): what one copy of it moves.
        where: ``"device"`` or ``"host"``: where its weights are bound right now.
        stages: for a staged swapped part (a DiT's), how many stages its copy is issued in; 0 otherwise.
    """

    name: str
    component: str
    kind: str
    nbytes: int
    where: str
    stages: int = 0
