"""The search behind ``auto``: which pieces of each component are resident, swapped or streamed.

:func:`plan_auto` minimises the predicted request time (:class:`~vramferry.planning.costmodel.PipelineCost`) subject to
the peak fitting the budget. Components without blocks (VAEs, small encoders) are resident or swapped; an
encoder with blocks may also stream them, all of them, through a ring of slots while it runs (a text encoder
runs once per request over a few hundred tokens, so streaming costs about its bytes over the bandwidth, and
holds only its non-block part and the slots). These are tried in combination, and for each combination every
DiT's blocks are placed by :func:`_place_dits`. When nothing fits, the leanest placement comes back, for the
caller to report as the least the pipeline needs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .costmodel import Choice, PartCost
from .plan import Placement

if TYPE_CHECKING:
    from .context import PlanContext


_R, _S, _T = Placement.RESIDENT, Placement.SWAPPED, Placement.STREAMED
_DEPTHS = (1, 2, 3, 4, 6, 8, 12, 16)  # prefetch depths tried; the smallest wins ties (fewest slots)
_MAX_ASSIGNMENTS = 256  # combinations of the free components' options tried exhaustively, at most


def uniform(part: PartCost, where: Placement) -> Choice:
    """The whole component, blocks included, in one place."""
    return Choice(where, (where,) * len(part.size.block_bytes))


def forced(ctx: PlanContext) -> set[str]:
    """Components that stay resident in every mode: role ``resident`` and ``keep_resident``."""
    keep = set(ctx.config.keep_resident)
    return {n for n, p in ctx.parts.items() if p.size.role == "resident" or n in keep}


def depths(ctx: PlanContext, streamed: int) -> tuple[int, ...]:
    """The prefetch depths worth trying for ``streamed`` blocks (only the configured one, if set)."""
    if ctx.config.prefetch_depth is not None:
        return (ctx.config.prefetch_depth,)
    return tuple(d for d in _DEPTHS if d <= 2 or d + 1 <= streamed)


# -- which blocks of a DiT to stream ---------------------------------------------------------------------------


def size_classes(sizes: Sequence[int]) -> list[int]:
    """Block sizes grouped within 5 %, largest class first; each class's largest size (at most 4 classes)."""
    classes: list[int] = []
    for size in sorted(set(sizes), reverse=True):
        if not classes or size < 0.95 * classes[-1]:
            classes.append(size)
    return classes[:4]


def spread_evenly(eligible: Sequence[int], m: int, weights: Sequence[float]) -> tuple[int, ...]:
    """``m`` of the ``eligible`` block indices spread evenly over a call's compute time (``weights``: per block).

    Spread out, streamed blocks have kept blocks computing between them that hide their copies with a few
    slots; bunched together, the copy engine would wait for a free slot.
    """
    if m >= len(eligible):
        return tuple(eligible)
    total = float(sum(weights))
    if total <= 0:
        weights, total = [1.0] * len(weights), float(len(weights))
    starts = list(itertools.accumulate(weights, initial=0.0))

    def mid(i: int) -> float:
        return starts[i] + weights[i] / 2

    chosen, j = [], 0
    for q in range(m):
        target = (q + 0.5) * total / m
        last = len(eligible) - (m - q)  # leave room for the picks still to come
        while j < last and abs(mid(eligible[j + 1]) - target) <= abs(mid(eligible[j]) - target):
            j += 1
        chosen.append(eligible[j])
        j += 1
    return tuple(chosen)


def spread_by_bytes(
    eligible: Sequence[int], sizes: Sequence[int], weights: Sequence[float], target: float
) -> tuple[int, ...]:
    """Eligible blocks chosen in order so that the streamed bytes track the compute done so far.

    Block ``i`` is streamed while the bytes streamed up to it stay within ``target × (compute up to i) / (all
    compute)`` (half a block of slack): copies then need about as long as the compute around them, everywhere
    in the call, which is what a few slots can sustain.
    """
    total = float(sum(weights)) or 1.0
    allowed = set(eligible)
    chosen, streamed, done = [], 0, 0.0
    for i, (nbytes, weight) in enumerate(zip(sizes, weights, strict=True)):
        done += weight
        if i in allowed and streamed + nbytes / 2 <= target * done / total:
            chosen.append(i)
            streamed += nbytes
    return tuple(chosen)


@dataclass(frozen=True)
class _Cand:
    """One way to stream a DiT's blocks: which are streamed, the depth, and what that costs."""

    flags: tuple[bool, ...]
    depth: int
    streamed_bytes: int
    slot_bytes: int  # all slots: (depth + 1) × the widest streamed block
    dit_s: float  # this DiT's seconds per request


def _dit_candidates(ctx: PlanContext, name: str) -> list[_Cand]:
    """Streamed sets × prefetch depths, with their times.

    A streamed set holds only blocks up to a size class (streaming only small blocks keeps the slots small), and
    is spread over the call two ways: evenly by count, and with its bytes tracking the compute.
    """
    part = ctx.parts[name]
    sizes = part.size.block_bytes
    n = len(sizes)
    sets = {(False,) * n}
    for threshold in size_classes(sizes):
        eligible = [i for i, b in enumerate(sizes) if b <= threshold]
        mean = sum(sizes[i] for i in eligible) / len(eligible)
        for m in range(1, len(eligible) + 1):
            for chosen in (
                spread_evenly(eligible, m, part.block_s),
                spread_by_bytes(eligible, sizes, part.block_s, m * mean),
            ):
                sets.add(tuple(i in set(chosen) for i in range(n)))
    cands = []
    for flags in sorted(sets):
        streamed = [b for b, f in zip(sizes, flags, strict=True) if f]
        blocks = tuple(_T if f else _S for f in flags)
        if not streamed:
            cands.append(_Cand(flags, 0, 0, 0, ctx.dit_time(name, Choice(_S, blocks))[0]))
            continue
        fastest = math.inf
        for depth in depths(ctx, len(streamed)):
            total = ctx.dit_time(name, Choice(_S, blocks, depth))[0]
            if depth > 2 and total >= fastest * (1 - 1e-4):
                continue  # more slots that buy nothing
            fastest = min(fastest, total)
            cands.append(_Cand(flags, depth, sum(streamed), (depth + 1) * max(streamed), total))
    return cands


def _fill(part: PartCost, cand: _Cand, cap: float) -> Choice:
    """Make the kept (not streamed) pieces resident while ``cap`` bytes allow, the non-block part first (a
    staged load's first call cannot compute before it lands), then blocks largest first; swap the rest."""
    kept = [(part.rest_bytes, -1)] + [
        (b, i) for i, (b, f) in enumerate(zip(part.size.block_bytes, cand.flags, strict=True)) if not f
    ]
    resident, used = set(), 0
    for nbytes, index in sorted(kept, key=lambda item: (item[1] >= 0, -item[0], item[1])):
        if used + nbytes <= cap:
            resident.add(index)
            used += nbytes
    blocks = tuple(_T if f else (_R if i in resident else _S) for i, f in enumerate(cand.flags))
    return Choice(_R if -1 in resident else _S, blocks, cand.depth)


def _best_for_dit(
    ctx: PlanContext, choices: dict[str, Choice], name: str, table: list[_Cand], resident: bool = True
) -> Choice | None:
    """The fastest feasible candidate for one DiT, the other components fixed; ``None`` if none fits.

    With ``resident``, kept pieces become resident as far as the other phases leave room; else all swapped.
    """
    part = ctx.parts[name]
    raw = ctx.evaluate({**choices, name: uniform(part, _S)}).raw_peaks
    others = max((v for p, v in raw.items() if p != name), default=0)
    cap = 0 if not resident else math.inf if ctx.budget is None else ctx.budget - others
    const = sum(
        ctx.dit_time(d, choices[d])[0] for d, p in ctx.parts.items() if p.size.role == "dit" and d != name
    )
    best: tuple | None = None
    for cand in sorted(table, key=lambda c: c.dit_s):
        if best is not None and cand.dit_s + const > best[0][0] + 1e-9:
            break  # loads only add time: nothing later can win
        if not ctx.fits(raw[name] - cand.streamed_bytes + cand.slot_bytes):
            continue
        choice = _fill(part, cand, cap)
        outcome = ctx.evaluate({**choices, name: choice})
        if ctx.fits(outcome.peak):
            key = (round(outcome.request_s, 9), cand.depth)
            if best is None or key < best[0]:
                best = (key, choice)
    return best[1] if best is not None else None


def _leanest(ctx: PlanContext, name: str, table: list[_Cand]) -> Choice:
    """The candidate with the smallest DiT phase, everything kept swapped."""
    cand = min(table, key=lambda c: (c.slot_bytes - c.streamed_bytes, c.dit_s))
    return _fill(ctx.parts[name], cand, 0)


def _place_dits(
    ctx: PlanContext, choices: dict[str, Choice], dits: list[str], tables: dict[str, list[_Cand]]
) -> bool:
    """Choose every DiT's candidate in ``choices`` (in place); False when some DiT cannot fit.

    One DiT: exact over its candidates. Two DiTs (Wan 2.2's experts): exact over pairs, their kept pieces
    swapped (a resident piece of one would sit in the other's phase too, and DiTs are exclusive anyway).
    More: coordinate descent, swapped likewise.
    """
    if len(dits) == 1:
        pick = _best_for_dit(ctx, choices, dits[0], tables[dits[0]])
        choices.update({dits[0]: pick} if pick is not None else {})
        return pick is not None
    if len(dits) == 2:
        return _place_pair(ctx, choices, dits[0], dits[1], tables)
    for _ in range(2):
        for d in dits:
            pick = _best_for_dit(ctx, choices, d, tables[d], resident=False)
            if pick is None:
                return False
            choices[d] = pick
    return True


def _place_pair(
    ctx: PlanContext, choices: dict[str, Choice], first: str, second: str, tables: dict[str, list[_Cand]]
) -> bool:
    raw = ctx.evaluate({**choices, first: uniform(ctx.parts[first], _S)}).raw_peaks[first]
    floor = min(c.dit_s for c in tables[second])
    best: tuple | None = None
    for cand in sorted(tables[first], key=lambda c: c.dit_s):
        if best is not None and cand.dit_s + floor > best[0][0] + 1e-9:
            break  # loads only add time: nothing later can win
        if not ctx.fits(raw - cand.streamed_bytes + cand.slot_bytes):
            continue
        trial = {**choices, first: _fill(ctx.parts[first], cand, 0)}
        pick = _best_for_dit(ctx, trial, second, tables[second], resident=False)
        if pick is not None:
            trial[second] = pick
            outcome = ctx.evaluate(trial)
            key = (round(outcome.request_s, 9), trial[first].depth + pick.depth)
            if best is None or key < best[0]:
                best = (key, trial)
    if best is not None:
        choices.update(best[1])
    return best is not None


# -- encoders, VAEs and the whole search -----------------------------------------------------------------------


def _options(ctx: PlanContext, name: str) -> list[Choice]:
    """A free component's placements: resident, swapped, and for an encoder with blocks, all of them streamed
    (the rest swapped in) through the fastest ring of slots (the fewest on ties) and through the smallest."""
    part = ctx.parts[name]
    options = [uniform(part, _R), uniform(part, _S)]
    n = len(part.size.block_bytes)
    if part.size.role != "encoder" or not n:
        return options
    rings = [Choice(_S, (_T,) * n, depth) for depth in depths(ctx, n)]
    fastest = min(rings, key=lambda c: (round(ctx.encoder_stall_s(name, c), 9), c.depth))
    smallest = min(rings, key=lambda c: c.depth)
    return options + list(dict.fromkeys((fastest, smallest)))


def _footprint(part: PartCost, choice: Choice) -> int:
    """Device bytes a placement of one component holds while its phase runs (activations left out)."""
    widest = max((b for b, w in zip(part.size.block_bytes, choice.blocks, strict=True) if w is _T), default=0)
    held = sum(b for b, w in zip(part.size.block_bytes, choice.blocks, strict=True) if w is not _T)
    return part.rest_bytes + held + (choice.depth + 1) * widest


def _assignments(ctx: PlanContext, free: Sequence[str]) -> Iterable[dict[str, Choice]]:
    """Placements of the free components to try, most resident first (the first of equals wins).

    Every combination of their options when there are few; otherwise smallest-first prefixes resident, the rest
    off the device in each way at once (all swapped, all encoders streamed fastest, all streamed smallest).
    """
    options = {n: _options(ctx, n) for n in free}
    if len(free) <= 6 and math.prod(len(o) for o in options.values()) <= _MAX_ASSIGNMENTS:
        combos = itertools.product(*options.values())
        for combo in sorted(combos, key=lambda c: -sum(choice.placement is _R for choice in c)):
            yield dict(zip(free, combo, strict=True))
        return
    ways = max((len(o) for o in options.values()), default=2) - 1
    for r in range(len(free), -1, -1):
        for way in range(1, ways + 1):
            yield {n: o[0] if i < r else o[min(way, len(o) - 1)] for i, (n, o) in enumerate(options.items())}


def _lean(ctx: PlanContext, free: Sequence[str], dits: Sequence[str], tables: dict[str, list[_Cand]]) -> dict:
    """The smallest placement: every free component in its least footprint, every DiT in its leanest."""
    choices = {n: uniform(p, _R) for n, p in ctx.parts.items()}
    for name in free:
        part = ctx.parts[name]
        choices[name] = min(_options(ctx, name)[1:], key=lambda c: _footprint(part, c))
    choices.update({d: _leanest(ctx, d, tables[d]) for d in dits})
    return choices


def plan_auto(ctx: PlanContext) -> dict[str, Choice]:
    """The fastest placement within the budget, or when nothing fits the leanest one (for the error)."""
    everything = {n: uniform(p, _R) for n, p in ctx.parts.items()}
    if ctx.fits(ctx.evaluate(everything).peak):
        return everything
    kept = forced(ctx)
    # Encoders, VAEs and DiTs without blocks: resident, swapped or (encoders) streamed, tried in combination.
    # Role "other" stays resident: it is tied to no phase, so swapping it would save no memory.
    dits = [n for n, p in ctx.parts.items() if n not in kept and p.size.role == "dit" and p.size.block_bytes]
    free = [n for n, p in ctx.parts.items() if n not in kept and n not in dits and p.phase is not None]
    free.sort(key=lambda n: (ctx.parts[n].size.bytes, n))
    tables = {d: _dit_candidates(ctx, d) for d in dits}
    best: tuple | None = None
    for assignment in _assignments(ctx, free):
        choices = {**everything, **assignment}
        choices.update({d: _leanest(ctx, d, tables[d]) for d in dits})
        if _place_dits(ctx, choices, dits, tables):
            outcome = ctx.evaluate(choices)
            key = (round(outcome.request_s, 9), sum(c.depth for c in choices.values()))
            if best is None or key < best[0]:
                best = (key, choices)
    return best[1] if best is not None else _lean(ctx, free, dits, tables)
