"""The host side of a plan: which pieces are copied into page-locked memory and which stay mapped in their files.

With ``host_memory_limit`` below the bytes the host store would hold, the pieces that move least often stay as
views of their checkpoint files (memory-mapped safetensors, in the page cache): first the resident ones (copied
to the device once, never again), then the swapped ones (once per request), the streamed blocks last (every
call). Copies from a mapped piece run at the pageable bandwidth, which the cost model prices. Pieces kept
compressed hold only their compressed bytes in the store and are never mapped.
"""

from __future__ import annotations

from collections.abc import Mapping

from .costmodel import Choice, PipelineCost, pieces
from .format import format_size
from .plan import Placement

#: Which pieces a plan maps, per component: its non-block part, then each block.
Mapped = dict[str, tuple[bool, ...]]


def host_bytes(ctx: PipelineCost, choices: Mapping[str, Choice]) -> int:
    """Bytes the host store holds for this placement: raw bytes, compressed ones where a codec keeps them."""
    return sum(round(ctx.ratios.get(name, 1.0) * ctx.parts[name].size.bytes) for name in choices)


def map_pieces(ctx: PipelineCost, choices: Mapping[str, Choice], limit: int) -> tuple[Mapped, int]:
    """The pieces to leave mapped so that the host store holds at most ``limit`` bytes, and the bytes still
    above the limit when every raw piece is mapped (0 when the limit is met)."""
    over = host_bytes(ctx, choices) - limit
    candidates = []
    for name, choice in choices.items():
        if name in ctx.ratios:
            continue  # held compressed
        part = ctx.parts[name]
        for at, (nbytes, where) in enumerate(pieces(part, choice)):
            candidates.append((moves_per_request(part.calls, where), -nbytes, name, at))
    flags = {name: [False] * (1 + len(ctx.parts[name].size.block_bytes)) for name in choices}
    for _moves, negative, name, at in sorted(candidates):
        if over <= 0:
            break
        flags[name][at] = True
        over += negative
    return {name: tuple(f) for name, f in flags.items() if any(f)}, max(over, 0)


def moves_per_request(calls: int, where: Placement | str) -> int:
    """How often a piece crosses the link in a request: resident never, swapped once, streamed every call."""
    if where == Placement.RESIDENT:
        return 0
    return 1 if where == Placement.SWAPPED else max(calls, 1)


def mapped_read_bytes(
    ctx: PipelineCost, choices: Mapping[str, Choice], mapped: Mapping[str, tuple[bool, ...]]
) -> int:
    """Bytes a request copies from mapped pieces."""
    total = 0
    for name, flags in mapped.items():
        part = ctx.parts[name]
        for at, (nbytes, where) in enumerate(pieces(part, choices[name])):
            if at < len(flags) and flags[at]:
                total += moves_per_request(part.calls, where) * nbytes
    return total


def host_note(ctx: PipelineCost, choices: Mapping[str, Choice], mapped: Mapped, limit: int, over: int) -> str:
    """One line of plan notes: the host side."""
    held = host_bytes(ctx, choices)
    kept = sum(
        nbytes
        for name, flags in mapped.items()
        for (nbytes, _where), m in zip(pieces(ctx.parts[name], choices[name]), flags, strict=True)
        if m
    )
    line = (
        f"host: {format_size(held - kept)} in page-locked memory, {format_size(kept)} left mapped in the "
        f"checkpoint files (host_memory_limit {format_size(limit)}); "
        f"{format_size(mapped_read_bytes(ctx, choices, mapped))} per request copied from the mapped pieces "
        f"at {ctx.device.pageable_bytes_per_s / 1e9:.1f} GB/s"
    )
    if over > 0:
        line += (
            f"; {format_size(over)} above the limit cannot be mapped (compressed pieces), and is kept in "
            "pageable memory"
        )
    return line
