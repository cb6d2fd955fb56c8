"""The cost model: time and memory of a placement, from bytes, FLOPs and the device's measured speeds.

Everything here is arithmetic on sizes; nothing touches a device. The formulas, in brief (DESIGN.md §3,
reference/peers.md §8 and §C):

- **Tokens.** An image DiT sees ``(H / (f·p)) · (W / (f·p))`` latent tokens per sample (VAE factor ``f`` = 8,
  patch ``p`` = 2), plus the text tokens when text joins the same sequence (Flux, Qwen-Image). A video DiT
  multiplies by the latent frames ``((frames - 1) / f_t + 1) / p_t`` (Wan: ``f_t`` = 4, ``p_t`` = 1).
- **Compute of one block, one call.** ``max(floor, 2·N·(P_main·T_main + P_text·T_text) / F + 4·T²·d·N / F_attn
  + 12·T·N·(d + d_ffn)·itemsize / M)``: weights that see only the text (a dual-stream block's text stream,
  cross-attention K/V) meet ``T_text`` tokens, adaLN modulation weights meet one token (left out), the rest meet
  the image tokens (the whole sequence in a single-stream block); ``4·T²·d`` is self-attention (plus
  ``4·T·T_text·d`` for cross-attention); the last term is ~12 passes of elementwise work over the activations
  at memory bandwidth ``M``; ``floor`` is what the host needs to launch a block's kernels. A measured per-block
  time (:attr:`Workload.block_compute_s`) replaces the estimate.
- **Copies.** A streamed block of ``b`` bytes takes ``b / B`` on the copy engine (``B``: pinned host→device
  bandwidth) and costs the compute stream ``per_block_overhead_s`` when it is handed over; while copies run,
  compute is slowed by ``copy_contention`` (~1-2 % measured).
- **One DiT call.** Simulated by :func:`simulate_dit_calls`: streamed blocks go through a ring of
  ``depth + 1`` device slots; the copy of a block starts when the copy engine is free and its slot has been
  released by the block ``depth + 1`` streamed blocks earlier. With slack to spare this gives the textbook
  ``max(Σ compute, streamed bytes / B) + overheads``; when resident blocks bunch together, it shows the copy
  engine idling because no slot is free.
- **Staged swap loads.** A swapped DiT's load lands its non-block part first, then block by block; its first
  call computes each block once the block has landed, so the copy hides all the blocks' compute up to the first
  streamed block but the last one's (:meth:`PipelineCost.staged_overlap_s`, counted by bytes, not positions).
- **Text encoders.** One forward per request over ``text_tokens`` tokens: ``2·P·T / F`` per layer (at least
  ``block_floor_s``). Streamed, its layers go through the same ring of slots as a DiT's, starting cold; what the
  copies add beyond that compute (about streamed bytes / ``B`` for T5-XXL) is added to the request.
- **Activations.** A DiT call holds about ``4 · T · N · (d + d_ffn) · itemsize`` bytes; a 2D VAE decode
  ``10 · H · W · C · itemsize`` (``C``: the decoder's top width), a causal video VAE (Wan, Qwen-Image)
  ``(10 + 13.5·f) · H · W · C · itemsize`` for ``f`` frames decoded at once (1 for an image, 4 for video); a
  text encoder ``256 MiB + 1 %`` of its weights.

Calibration (H100 80GB HBM3, torch 2.11, diffusers 0.42.1, random bf16 weights; per-block times with CUDA
events): Flux.1-dev blocks 3.31 / 3.03 ms (double / single) at 1024², 7.9 / 7.3 at 1536², 15.8 / 15.0 at
2048²; Qwen-Image 5.94 ms at 1328², 10.2 at 1664²; Wan2.1-14B 13.2 / 35.0 / 83.6 ms at 480×832 with 17 / 41 /
81 frames. The fit (``F`` = 465, ``F_attn`` = 632 TFLOP/s, 12 passes at 3.0 TB/s) is within ±10 % of each,
5.5 % rms. Below ~2k tokens the host sets the pace: Flux's blocks took 1.3-2.0 ms at 512², Qwen-Image's 3.3 ms
at 768² and 1024² (``block_floor_s`` = 1.5 ms). Activations measured: Flux 1024² 0.49 GB, Qwen-Image 1328²
0.65 GB, Wan 81 frames 3.73 GB (the formula gives 15-35 % more). VAE decodes: Flux 1024² 2.55 GB, Qwen-Image
1328² 7.46 GB, Wan 480×832×81 4.70 GB. Text encoders: T5-XXL and UMT5-XXL at 512 tokens 0.24 GB, Qwen2.5-VL
at 256 tokens 0.16 GB.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..discovery.shapes import DitShape, VaeShape, dit_shape_from_config, itemsize_of
from ..errors import PlanError
from .codec import CHUNK_BYTES, load_seconds, staging_bytes
from .devices import DeviceProfile
from .plan import RESIDENT, STREAMED, SWAPPED, Placement
from .workload import Workload

if TYPE_CHECKING:
    from ..discovery.inventory import ComponentSize


GiB = 2**30


# The caching allocator reserves more than it hands out: blocks freed by one phase (activations of other
# shapes, slots of another block size) stay cached beside the next phase's. Measured on an H100 for FLUX.1 under
# budgets of 8-24 GB with the default allocator: reserved exceeded allocated by 0.8-1.1 GB. With
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True segments grow in place and the gap nearly vanishes: measured
# on an H200 for FLUX.1 under the same budgets, 0.09-0.11 GB through encoding and denoising (ten runs); the VAE
# decode keeps more cached, which its workspace estimate counts (VAE_CACHE_FRACTION).
# Plans count the gap, so that reserved memory stays within the budget.
ALLOCATOR_SLACK = {
    False: (0.15, 9 * 2**30 // 8),
    True: (0.015, 3 * 2**30 // 20),
}  # expandable -> (fraction, cap)
# A handle that has re-placed its weights on the device (another request shape, measured block times) also keeps
# cached blocks of the earlier placements' sizes: with expandable segments, measured on an H200 for FLUX.1 at
# 16 GB with requests cycling 512², 1024², 768², 1536², reserved exceeded allocated by up to 0.42 GB.
REPLACED_SLACK_CAP = 9 * 2**30 // 20


def _slack(expandable: bool, replacing: bool) -> tuple[float, int]:
    fraction, cap = ALLOCATOR_SLACK[expandable]
    if replacing and cap < REPLACED_SLACK_CAP:
        return 1.0, REPLACED_SLACK_CAP  # that much, whatever the size of the allocations
    return fraction, cap


def reserved_bytes(allocated: int, expandable: bool = False, replacing: bool = False) -> int:
    """The device memory the caching allocator reserves to serve ``allocated`` bytes at a phase's peak
    (``replacing``: under a plan a handle switched to on the device)."""
    fraction, cap = _slack(expandable, replacing)
    return allocated + min(cap, int(fraction * allocated))


def allocatable_bytes(budget: int, expandable: bool = False, replacing: bool = False) -> int:
    """The most bytes a plan may allocate so that :func:`reserved_bytes` stays within ``budget``."""
    fraction, cap = _slack(expandable, replacing)
    proportional = int(budget / (1 + fraction))
    allocated = proportional if fraction * proportional <= cap else budget - cap
    # Exact inverse despite float rounding: the largest value whose reserved size fits.
    while reserved_bytes(allocated + 1, expandable, replacing) <= budget:
        allocated += 1
    while allocated > 0 and reserved_bytes(allocated, expandable, replacing) > budget:
        allocated -= 1
    return allocated


def block_flops(
    params: int, shape: DitShape, workload: Workload, text_params: int = 0, mod_params: int = 0
) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) of one block in one DiT call.

    Linear: ``2·N·(P_main·T_main + P_text·T_text)``. Modulation weights (adaLN, ``mod_params``) see one token
    and are left out; text-only weights (``text_params``) see the text tokens; the rest sees the image tokens
    in a block that has text-only weights (dual-stream, cross-attention), else the whole sequence. With no
    split known, every weight meets every token. Attention: ``4·T²·d·N`` for self-attention, plus
    ``4·T·T_text·d·N`` for cross-attention.
    """
    seq = workload.sequence_of(shape)
    n = workload.batch
    text = workload.text_tokens
    main_tokens = seq - (text if shape.joint_text else 0) if text_params else seq
    linear = 2.0 * n * ((params - text_params - mod_params) * main_tokens + text_params * text)
    attention = 4.0 * seq * seq * shape.hidden_size * n
    if not shape.joint_text:
        attention += 4.0 * seq * text * shape.hidden_size * n
    return linear, attention


def block_compute_s(
    params: int,
    shape: DitShape,
    workload: Workload,
    device: DeviceProfile,
    text_params: int = 0,
    mod_params: int = 0,
) -> float:
    """Estimated seconds of one block in one DiT call (see the module docstring)."""
    linear, attention = block_flops(params, shape, workload, text_params, mod_params)
    elementwise = 12 * workload.sequence_of(shape) * workload.batch * (shape.hidden_size + shape.ffn) * 2
    gpu = linear / device.flops_per_s + attention / device.attention_flops_per_s
    return max(device.block_floor_s, gpu + elementwise / device.memory_bytes_per_s)


def linear_compute_s(params: int, tokens: int, device: DeviceProfile) -> float:
    """Seconds for ``params`` parameters of matmuls over ``tokens`` tokens (embeddings, encoders)."""
    return 2.0 * params * tokens / device.flops_per_s


def dit_activation_bytes(shape: DitShape, workload: Workload, itemsize: int = 2) -> int:
    """Activation memory of one DiT call: ``4 · T · N · (d + d_ffn) · itemsize``."""
    seq = workload.sequence_of(shape)
    return int(4 * seq * workload.batch * (shape.hidden_size + shape.ffn) * itemsize)


# A decode allocates and frees buffers of many sizes (one per resolution level): the caching allocator keeps
# more of it cached than in any other phase. Measured on an H200 with expandable segments (FLUX.1's VAE at
# 1024², 2.06 GB allocated): 0.43-0.45 GB reserved beyond what was allocated, in every one of five budgets, and
# the same on an OmniGen2-sized layout; other phases kept 0.09-0.11 GB. Counted as part of the workspace.
VAE_CACHE_FRACTION = 0.2


def vae_workspace_bytes(shape: VaeShape, workload: Workload, itemsize: int = 2) -> int:
    """Decode workspace of a VAE: ``10·H·W·C·s`` (2D), ``(10 + 13.5·f)·H·W·C·s`` (causal video), times batch,
    plus :data:`VAE_CACHE_FRACTION` of it for what the allocator keeps cached during the decode."""
    pixels = workload.height * workload.width * shape.base_channels * itemsize * workload.batch
    frames = shape.frames_per_chunk if workload.num_frames > 1 else 1
    workspace = 10 * pixels if not shape.video else (10 + 13.5 * frames) * pixels
    return int((1 + VAE_CACHE_FRACTION) * workspace)


def encoder_workspace_bytes(weight_bytes: int) -> int:
    """Activation memory of a text encoder's forward: 256 MiB plus 1 % of its weights."""
    return 256 * 2**20 + weight_bytes // 100


def simulate_dit_calls(
    blocks: Sequence[tuple[int, float, bool]],
    rest_s: float,
    depth: int,
    device: DeviceProfile,
    calls: int = 3,
    ratio: float = 1.0,
) -> tuple[float, float]:
    """Simulate consecutive calls of one DiT; returns (first call seconds, steady-state call seconds).

    Args:
        blocks: per block in execution order: (bytes, compute seconds, streamed?).
        rest_s: compute seconds outside the blocks (embeddings, output layers), run before them.
        depth: prefetch depth: streamed blocks use a ring of ``depth + 1`` device slots.
        device: bandwidth, per-block overhead and copy contention.
        calls: calls to simulate; the last one is taken as the steady state (the ring wraps across calls).
        ratio: streamed blocks cross the link compressed to this fraction of their bytes and are decoded on the
            device (1: raw).

    The runtime's contract modelled here: the copy of streamed block ``g`` (counted across calls) runs on a
    copy stream after the copy of ``g - 1``, into the slot released when block ``g - depth - 1`` finished
    computing; block ``g`` computes once its copy has landed, ``per_block_overhead_s`` after. Compressed, a
    block crosses in chunks of :data:`~vramferry.planning.codec.CHUNK_BYTES` (raw): each chunk's copy lands in
    one of two staging buffers, free once the decode of the chunk two before has run; a chunk decodes on its own
    stream after its copy, after the previous decode and (its block's first chunk) once the slot is released.
    So the link runs at most two chunks ahead of the slot it fills. The block computes once it is decoded, and
    each decode costs the compute stream ``decode_contention`` of its time.
    """
    slots = depth + 1
    compressed = ratio < 1.0
    # Raw blocks cross every link at once (helper GPUs' too); compressed ones the device's own link alone.
    bandwidth = device.h2d_bytes_per_s if compressed else device.stream_bytes_per_s
    overhead = device.per_block_overhead_s
    slow = 1.0 + device.copy_contention if any(s for _, _, s in blocks) else 1.0
    finished: list[float] = []  # compute end of every streamed block so far
    stages = [0.0, 0.0]  # when each staging buffer is free again: the decode end of the chunk it last held
    decode_free = 0.0
    copy_free = 0.0
    now = 0.0
    durations = []
    for _ in range(calls):
        start = now
        now += rest_s * slow
        for nbytes, compute, streamed in blocks:
            if streamed:
                g = len(finished)
                slot_free = finished[g - slots] if g >= slots else 0.0
                if not compressed:
                    copy_free = max(copy_free, slot_free) + nbytes / bandwidth
                    now = max(now, copy_free) + overhead
                    now += compute * slow
                else:
                    decode_free = max(decode_free, slot_free)
                    for at in range(0, nbytes, CHUNK_BYTES):
                        chunk = min(CHUNK_BYTES, nbytes - at)
                        copy_free = max(copy_free, stages[0]) + ratio * chunk / bandwidth
                        decode_free = max(decode_free, copy_free) + chunk / device.decode_bytes_per_s
                        stages = [stages[1], decode_free]
                    now = max(now, decode_free) + overhead
                    now += compute * slow + device.decode_contention * nbytes / device.decode_bytes_per_s
                finished.append(now)
            else:
                now += compute * slow
        durations.append(now - start)
    return durations[0], durations[-1]


ENCODER_PHASE, VAE_PHASE = "encoders", "vaes"


@dataclass(frozen=True)
class Choice:
    """One component's placement: its non-block part, its blocks (``Placement`` values), the prefetch depth."""

    placement: Placement
    blocks: tuple[Placement, ...] = ()
    depth: int = 0


@dataclass(frozen=True)
class PartCost:
    """One component under a workload.

    Attributes:
        size: its ``ComponentSize``.
        phase: the phase whose swap group it joins: ``"encoders"``, the DiT's own name, ``"vaes"``; ``None`` for
            a component tied to no phase (counted in every phase).
        act: activation/workspace bytes while it runs.
        calls: DiT calls per request; 1 for an encoder with blocks (one forward per request).
        block_s, rest_s: compute seconds per call of each block and of the rest (DiTs, encoders with blocks).
        compute_s: an encoder's forward seconds (what prefetch of the next phase can hide behind).
    """

    size: ComponentSize
    phase: str | None
    act: int = 0
    calls: int = 0
    block_s: tuple[float, ...] = ()
    rest_s: float = 0.0
    compute_s: float = 0.0

    @property
    def rest_bytes(self) -> int:
        return self.size.rest_bytes if self.size.block_bytes else self.size.bytes


@dataclass(frozen=True)
class Outcome:
    """What a placement costs: peaks per phase (``raw_peaks`` before prefetch overlap) and times
    (``encoder_stall_s``: what streamed encoder blocks add to the request)."""

    peak: int
    phase_peaks: dict[str, int]
    step_s: float
    request_s: float
    load_bytes: int
    hidden_s: float
    raw_peaks: dict[str, int]
    encoder_stall_s: float = 0.0


def pieces(part: PartCost, choice: Choice) -> Iterable[tuple[int, str]]:
    """(bytes, placement) of the non-block part and of every block."""
    yield part.rest_bytes, choice.placement
    yield from zip(part.size.block_bytes, choice.blocks, strict=True)


def dit_shape_of(size: ComponentSize) -> DitShape:
    """A DiT's :class:`DitShape`, guessed from its block sizes when the inventory has none."""
    if isinstance(size.shape, DitShape):
        return size.shape
    return dit_shape_from_config({}, size.block_bytes, itemsize_of(size.dtype))


# Regionally compiled blocks (inductor) compute faster than eager ones: measured on an H200, FLUX.1-sized
# transformer at 1024² under auto at 16 GB, 2.08 ms per block compiled against 3.05 ms eager (the resident step
# 0.136 s against 0.175 s). The estimate of a compiled DiT's blocks is scaled by this until they are measured.
COMPILED_BLOCK_FACTOR = 0.68


# Weight formats whose matmuls take longer than bf16 ones, by how much. torchao's fp8 weight-only dequantizes every
# weight before its matmul: measured on an H200, FLUX.1-sized transformer at 1024², 0.274 s per resident step
# against 0.175 s in bf16. Formats not listed are estimated as bf16 until their blocks are measured.
FORMAT_BLOCK_FACTORS = {"Float8Tensor weight-only": 1.55}

# A quantized matmul dequantizes its weight first (torchao weight-only, GGUF, bitsandbytes 4-bit): float32 and
# 16-bit copies of the largest weight, (d + d_ffn) · d elements, of sizes unlike the activations', which the
# caching allocator keeps cached beside them. Measured on an H200 (FLUX.1-sized, fp8 weight-only, auto at 8 GB),
# with activations counted at the storage dtype's single byte: 0.48 GB allocated and 0.65 GB reserved beyond the
# plan's peak. 16-bit activations (0.28 GB more) and this workspace (8 bytes per element, 0.38 GB) cover both.
DEQUANTIZED_BYTES_PER_ELEMENT = 8


def dequantize_workspace_bytes(size: ComponentSize) -> int:
    """Device bytes a DiT whose weights are quantized spends dequantizing them per matmul (0 for plain ones)."""
    if not size.formats:
        return 0
    shape = dit_shape_of(size)
    return DEQUANTIZED_BYTES_PER_ELEMENT * (shape.hidden_size + shape.ffn) * shape.hidden_size


def estimated_block_times(
    size: ComponentSize, workload: Workload, device: DeviceProfile
) -> tuple[float, ...]:
    """The cost model's compute seconds of each of a DiT's blocks in one call (no measurement used); compiled
    blocks are expected :data:`COMPILED_BLOCK_FACTOR` times as long, never below the launch floor, and weight
    formats slower than bf16 :data:`FORMAT_BLOCK_FACTORS` times as long."""
    itemsize = itemsize_of(size.dtype)
    shape = dit_shape_of(size)
    n = len(size.block_bytes)
    text = shape.text_bytes if len(shape.text_bytes) == n else (0,) * n
    mod = shape.mod_bytes if len(shape.mod_bytes) == n else (0,) * n
    eager = (
        block_compute_s(b // itemsize, shape, workload, device, t // itemsize, m // itemsize)
        for b, t, m in zip(size.block_bytes, text, mod, strict=True)
    )
    slower = max((FORMAT_BLOCK_FACTORS.get(f, 1.0) for f in size.formats), default=1.0)
    if not size.compiled_blocks:
        return tuple(slower * t for t in eager)
    return tuple(max(device.block_floor_s, COMPILED_BLOCK_FACTOR * slower * t) for t in eager)


def _dit_part(size: ComponentSize, calls: int, device: DeviceProfile, workload: Workload) -> PartCost:
    itemsize = itemsize_of(size.dtype)
    shape = dit_shape_of(size)
    measured = workload.block_compute_s.get(size.name)
    if isinstance(measured, tuple):
        if len(measured) != len(size.block_bytes):
            raise PlanError(
                f"block_compute_s[{size.name!r}]: {len(measured)} times given for {len(size.block_bytes)} blocks; "
                "give one per block in execution order, or a single number"
            )
        block_s = measured
    elif measured is not None:
        block_s = (float(measured),) * len(size.block_bytes)
    else:
        block_s = estimated_block_times(size, workload, device)
    tokens = workload.sequence_of(shape) * workload.batch
    rest = size.rest_bytes if size.block_bytes else size.bytes
    # Quantized weights compute in a 16-bit dtype: their activations are not of the storage dtype.
    act_itemsize = max(itemsize, 2) if size.formats else itemsize
    act = dit_activation_bytes(shape, workload, act_itemsize) + dequantize_workspace_bytes(size)
    return PartCost(size, size.name, act, calls, block_s, linear_compute_s(rest // itemsize, tokens, device))


def _part(size: ComponentSize, calls: int, device: DeviceProfile, workload: Workload) -> PartCost:
    itemsize = itemsize_of(size.dtype)
    if size.role == "dit":
        return _dit_part(size, calls, device, workload)
    if size.role == "encoder":
        tokens = workload.text_tokens * workload.batch
        act = encoder_workspace_bytes(size.bytes)
        if not size.block_bytes:
            return PartCost(
                size, ENCODER_PHASE, act, compute_s=linear_compute_s(size.bytes // itemsize, tokens, device)
            )
        # Few tokens: each layer is quick, and the host launching its kernels sets a floor, as for DiT blocks.
        block_s = tuple(
            max(device.block_floor_s, linear_compute_s(b // itemsize, tokens, device))
            for b in size.block_bytes
        )
        rest_s = linear_compute_s(size.rest_bytes // itemsize, tokens, device)
        return PartCost(size, ENCODER_PHASE, act, 1, block_s, rest_s, rest_s + sum(block_s))
    if size.role == "vae":
        shape = size.shape if isinstance(size.shape, VaeShape) else VaeShape()
        return PartCost(size, VAE_PHASE, vae_workspace_bytes(shape, workload, itemsize))
    return PartCost(size, None)


class PipelineCost:
    """Peak memory and predicted time of any placement of one pipeline, for one workload on one device.

    Phases run in ``order`` (default: encoders, DiTs, VAEs). A phase's peak is the resident bytes plus its
    swap group, its streaming slots and its activations. A request's time is every DiT call (simulated) plus
    the swap loads at the host→device bandwidth, plus what streamed encoder blocks stall, less the loads that
    overlap the previous phase's compute (``prefetch_components``, when both fit in the budget at once; behind a
    phase that streams, only the copy engine's idle time counts). With ``exclusive`` (no budget was given, so the
    exclusion rules hold strictly at run time) a DiT's group is not prefetched behind the encoders or another DiT.
    """

    def __init__(
        self,
        components: Sequence[ComponentSize],
        order: Sequence[str],
        device: DeviceProfile,
        workload: Workload,
        budget: int | None,
        prefetch_components: bool = True,
        exclusive: bool = False,
        ratios: Mapping[str, float] | None = None,
        mapped: Mapping[str, tuple[bool, ...]] | None = None,
    ) -> None:
        self.device, self.workload, self.budget = device, workload, budget
        # Components whose moved pieces cross the link compressed, with the fraction of bytes they keep.
        self.ratios = dict(ratios or {})
        # Per component, which pieces (the non-block part, then each block) stay mapped in their checkpoint
        # files: their copies run at the pageable bandwidth.
        self.mapped = {name: flags for name, flags in (mapped or {}).items() if any(flags)}
        self.prefetch_components = prefetch_components
        self.exclusive = exclusive
        dits = sum(c.role == "dit" for c in components)
        calls = max(1, round(workload.dit_calls() / max(dits, 1)))  # several DiTs share the steps evenly
        self.parts = {c.name: _part(c, calls, device, workload) for c in components}
        phases: list[str] = []
        by_role = [c.name for r in ("encoder", "dit", "vae") for c in components if c.role == r]
        for name in [*order, *by_role]:
            phase = self.parts[name].phase if name in self.parts else None
            if phase is not None and phase not in phases:
                phases.append(phase)
        self.phases = tuple(phases)
        self._sims: dict[tuple, tuple[float, float]] = {}

    def fits(self, nbytes: int) -> bool:
        return self.budget is None or nbytes <= self.budget

    def dit_time(self, name: str, choice: Choice) -> tuple[float, float]:
        """(seconds of all this component's calls in a request, seconds of one steady-state call).

        For a DiT: its denoising calls. For an encoder with blocks: its one forward, the ring of slots starting
        cold (the first blocks' copies start when it does).
        """
        part = self.parts[name]
        if not part.size.block_bytes:
            return part.calls * part.rest_s, part.rest_s
        flags = tuple(p == STREAMED for p in choice.blocks)
        depth = max(choice.depth, 1) if any(flags) else 0
        ratio = self.ratios.get(name, 1.0)
        key = (name, flags, depth, ratio)
        if key not in self._sims:
            # A mapped block's copy takes as long as that of a pinned one this many times its size.
            slower = self.device.stream_bytes_per_s / self.device.pageable_bytes_per_s
            sizes = [
                round(b * slower) if m else b
                for b, m in zip(part.size.block_bytes, self._blocks_mapped(name), strict=True)
            ]
            blocks = list(zip(sizes, part.block_s, flags, strict=True))
            self._sims[key] = simulate_dit_calls(blocks, part.rest_s, max(depth, 1), self.device, ratio=ratio)
        first, steady = self._sims[key]
        return first + (part.calls - 1) * steady, steady

    def encoder_stall_s(self, name: str, choice: Choice) -> float:
        """Seconds an encoder's streamed blocks add to its forward: copies that its compute does not hide."""
        if STREAMED not in choice.blocks:
            return 0.0
        whole = Choice(choice.placement, tuple(SWAPPED for _ in choice.blocks))
        return max(0.0, self.dit_time(name, choice)[0] - self.dit_time(name, whole)[0])

    def staged_overlap_s(self, part: PartCost, choice: Choice, prefetched_s: float) -> float:
        """Seconds of a DiT's swap load that its first call hides. The load is staged at block boundaries: the
        part outside the blocks lands first, then each block computes once its bytes have landed, so the blocks'
        compute (up to the first streamed block, whose copy queues behind the load) overlaps the copy, all but
        the block that runs after the last stage. Counted by bytes, not by which blocks are swapped, so that
        swapping less never predicts slower. ``prefetched_s``: how long the load ran before the call began."""
        if SWAPPED not in choice.blocks or part.size.name in self.ratios:
            return 0.0  # a compressed load is decoded whole before the call (not staged)
        bandwidth = self.device.h2d_bytes_per_s
        head = (part.rest_bytes if choice.placement == SWAPPED else 0) / bandwidth - prefetched_s
        swapped = sum(
            b for b, where in zip(part.size.block_bytes, choice.blocks, strict=True) if where == SWAPPED
        )
        load_end = head + swapped / bandwidth
        if load_end <= 0:
            return 0.0  # prefetch hid it all
        prefix = part.block_s[: choice.blocks.index(STREAMED) if STREAMED in choice.blocks else None]
        overlap = sum(prefix) - max(prefix, default=0.0)
        stall = max(head, load_end - overlap, 0.0)
        return load_end - stall

    def _blocks_mapped(self, name: str) -> list[bool]:
        flags = self.mapped.get(name, ())
        return [bool(m) for m in flags[1:]] + [False] * (len(self.parts[name].size.block_bytes) - len(flags[1:]))

    def piece_load_s(self, name: str, nbytes: int, mapped: bool) -> float:
        """Seconds to load one piece of component ``name``: from a checkpoint file's mapping at the pageable
        bandwidth, else as :meth:`load_s`."""
        return nbytes / self.device.pageable_bytes_per_s if mapped else self.load_s(name, nbytes)

    def load_s(self, name: str, nbytes: int) -> float:
        """Seconds to load ``nbytes`` of component ``name`` (compressed where :attr:`ratios` says)."""
        return load_seconds(
            nbytes, self.ratios.get(name, 1.0), self.device.h2d_bytes_per_s, self.device.decode_bytes_per_s
        )

    def evaluate(self, choices: Mapping[str, Choice]) -> Outcome:
        """The peak memory and predicted times of a complete placement."""
        always, loads, loads_s = 0, 0, 0.0
        swapped, slots, act, streamed = (dict.fromkeys(self.phases, 0) for _ in range(4))
        swapped_s = dict.fromkeys(self.phases, 0.0)
        for name, choice in choices.items():
            part = self.parts[name]
            widest = moved = 0
            flags = self.mapped.get(name, ())
            for at, (nbytes, where) in enumerate(pieces(part, choice)):
                load_s = self.piece_load_s(name, nbytes, at < len(flags) and flags[at])
                if where == RESIDENT or where == SWAPPED and part.phase is None:
                    always += nbytes
                elif where == SWAPPED:
                    swapped[part.phase] += nbytes
                    swapped_s[part.phase] += load_s
                else:
                    widest = max(widest, nbytes)
                    streamed[part.phase] += self.ratios.get(name, 1.0) * nbytes
                if where == SWAPPED:
                    loads += nbytes
                    loads_s += load_s
                moved = max(moved, nbytes) if where != RESIDENT else moved
            if part.phase is not None:
                slots[part.phase] += (choice.depth + 1) * widest
                act[part.phase] = max(act[part.phase], part.act)
            if name in self.ratios and moved and part.phase is not None:
                slots[part.phase] += staging_bytes(moved, self.ratios[name])
        raw = {p: always + swapped[p] + slots[p] + act[p] for p in self.phases} or {"weights": always}
        peaks = dict(raw)
        compute = dict.fromkeys(self.phases, 0.0)
        dit_s = call_s = stall = 0.0
        for name, part in self.parts.items():
            if part.phase == ENCODER_PHASE:
                stall += self.encoder_stall_s(name, choices[name])
                compute[ENCODER_PHASE] += part.compute_s
            elif part.size.role == "dit":
                total, steady = self.dit_time(name, choices[name])
                compute[name] = total
                dit_s, call_s = dit_s + total, call_s + part.calls * steady
        bandwidth = self.device.stream_bytes_per_s
        if ENCODER_PHASE in compute:
            # Streamed encoder blocks keep the copy engine busy: only its idle time can hide the next load.
            busy = streamed[ENCODER_PHASE] / bandwidth  # bytes that cross the link
            compute[ENCODER_PHASE] = max(0.0, compute[ENCODER_PHASE] + stall - busy)
        hidden = 0.0
        hidden_into = dict.fromkeys(self.phases, 0.0)
        if self.prefetch_components:
            # The next phase's swap group loads while this phase computes, when both fit at once.
            for here, nxt in itertools.pairwise(self.phases):
                if self.exclusive and nxt not in (ENCODER_PHASE, VAE_PHASE) and here != VAE_PHASE:
                    continue  # the next phase is a DiT's, which the encoders and the other DiTs exclude
                extra = swapped[nxt] + slots[nxt]
                if swapped[nxt] and self.fits(peaks[here] + extra):
                    hidden_into[nxt] = min(swapped_s[nxt], compute[here])
                    hidden += hidden_into[nxt]
                    peaks[here] += extra
        for name, part in self.parts.items():
            if part.size.role == "dit" and part.phase in hidden_into:
                hidden += self.staged_overlap_s(part, choices[name], hidden_into[part.phase])
        request = dit_s + stall + loads_s - hidden
        steps = self.workload.steps
        return Outcome(max(peaks.values()), peaks, call_s / steps, request, loads, hidden, raw, stall)
