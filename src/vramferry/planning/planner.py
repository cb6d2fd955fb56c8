"""Pure placement planning: sizes, a budget and a cost model in; a :class:`Plan` out. No CUDA calls here.

A request runs in phases: the text encoders, each DiT (all its denoising calls), the VAE. A component is
RESIDENT (on the device in every phase), SWAPPED (on the device only in its own phase: encoders together, each
DiT alone, VAEs together) or, for the blocks of a DiT or (in ``auto``) of a text encoder, STREAMED through
``prefetch_depth + 1`` device slots that exist while the component runs. The peak of a phase is

    resident bytes + the phase's swapped bytes + its streaming slots + its activations

and the plan's peak is the largest phase peak. ``auto`` minimises the predicted request time (DiT calls
simulated by :func:`~vramferry.planning.costmodel.simulate_dit_calls`, plus swap loads at the host→device bandwidth,
plus what streamed encoder blocks stall, less what cross-component prefetch hides) subject to that peak
fitting the budget; the search lives in :mod:`vramferry.planning.search`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..config import Compression, OffloadConfig, OffloadMode
from ..discovery.inventory import ComponentSize, Inventory
from ..discovery.shapes import DitShape
from ..errors import BudgetError, PlanError
from ..units import format_bytes, parse_bytes
from .calibrate import Measurements, with_measured_times
from .codec import LOSSLESS, codec_estimate, keep_compressed, wanted
from .context import PlanContext
from .costmodel import (
    ENCODER_PHASE,
    VAE_PHASE,
    Choice,
    Outcome,
    allocatable_bytes,
    pieces,
    reserved_bytes,
)
from .devices import DeviceProfile, profile_from
from .format import format_size
from .plan import ComponentPlan, Placement, Plan
from .policy import phase_of
from .schedule import Movable, build_schedule
from .search import depths, forced, plan_auto, uniform
from .tiers import host_bytes, host_note, map_pieces
from .workload import Workload

if TYPE_CHECKING:
    pass


def resolve_budget(
    config: OffloadConfig, *, device: DeviceProfile | None = None, free_bytes: int | None = None
) -> tuple[int | None, str]:
    """The budget in bytes (``None``: unlimited) and a sentence saying where it came from.

    ``vram_budget`` bytes or ``"16GiB"`` are taken as given (capped at the free or device memory when known);
    ``"80%"`` is a share of ``free_bytes`` (else of ``device.memory_bytes``); ``None`` is that memory minus
    ``safety_margin``, or unlimited when neither is known.
    """
    if free_bytes is not None:
        total, basis = int(free_bytes), "free device memory"
    elif device is not None:
        total, basis = device.memory_bytes, f"{device.name} memory"
    else:
        total, basis = None, ""
    value = config.vram_budget
    if value is None:
        if total is None:
            return None, "unlimited: vram_budget is unset and the device memory is unknown"
        margin = parse_bytes(config.safety_margin, what="safety_margin")
        budget, text = (
            total - margin,
            f"{basis} {format_bytes(total)} minus safety_margin {format_bytes(margin)}",
        )
    elif isinstance(value, str) and value.endswith("%"):
        if total is None:
            raise PlanError(
                f"vram_budget: {value!r} is a share of the free device memory, which is unknown here; "
                "pass free_bytes= or device= (--gpu or --gpu-memory on the command line), or give a size such as "
                "'16GiB'"
            )
        budget, text = int(total * float(value[:-1]) / 100), f"{value} of the {basis} {format_bytes(total)}"
    else:
        budget, text = parse_bytes(value, what="vram_budget"), f"vram_budget={value!r}"
        if total is not None and budget > total:
            budget, text = total, f"{text}, capped at the {basis} {format_bytes(total)}"
    if budget <= 0:
        raise BudgetError(f"vram_budget: nothing is left for the pipeline ({text}); free device memory first")
    return budget, text


_R, _S, _T = Placement.RESIDENT, Placement.SWAPPED, Placement.STREAMED
COMPRESSED_DEPTH_TOLERANCE = 0.02


def _plan_fixed(ctx: PlanContext) -> dict[str, Choice]:
    """``none``, ``model`` and ``layerwise``: shapes fixed by the mode; only the prefetch depth is chosen."""
    mode = ctx.config.mode
    kept = forced(ctx)
    choices: dict[str, Choice] = {}
    for name, part in ctx.parts.items():
        if mode is OffloadMode.NONE or name in kept:
            choices[name] = uniform(part, _R)
        elif mode is OffloadMode.LAYERWISE and part.size.role == "dit" and part.size.block_bytes:
            choices[name] = Choice(_R, (_T,) * len(part.size.block_bytes), 2)
        else:
            choices[name] = uniform(part, _S)
    if mode is OffloadMode.LAYERWISE:
        for name, choice in list(choices.items()):
            if _T in choice.blocks:
                choices[name] = _best_depth(ctx, choices, name)
    return choices


def _best_depth(ctx: PlanContext, choices: dict[str, Choice], name: str) -> Choice:
    """The fastest depth that fits (the fewest slots on ties); depth 1 when none fits, for the error to report.

    For a compressed component, the fewest slots within :data:`COMPRESSED_DEPTH_TOLERANCE` of the fastest: its two
    staging buffers already hold the next chunks, so a slot more buys little and costs a whole block of memory."""
    choice = choices[name]
    fitting: list[tuple[float, int, Choice]] = []
    for depth in depths(ctx, sum(p is _T for p in choice.blocks)):
        trial = Choice(choice.placement, choice.blocks, depth)
        outcome = ctx.evaluate({**choices, name: trial})
        if ctx.fits(outcome.peak):
            fitting.append((round(outcome.request_s, 9), depth, trial))
    if not fitting:
        return Choice(choice.placement, choice.blocks, min(depths(ctx, 1)))
    fastest = min(fitting)[0]
    slack = COMPRESSED_DEPTH_TOLERANCE if name in ctx.ratios else 0.0
    return min((d, t) for s, d, t in fitting if s <= fastest * (1 + slack))[1] if slack else min(fitting)[2]


def _phase_items(ctx: PlanContext, choices: Mapping[str, Choice], phase: str) -> list[tuple[str, int]]:
    """What occupies the device in ``phase``: (label, bytes), largest first after the resident total."""
    resident, items = 0, []
    for name, choice in choices.items():
        part = ctx.parts[name]
        widest = max((b for b, w in pieces(part, choice) if w is _T), default=0)
        swapped = sum(b for b, w in pieces(part, choice) if w is _S)
        resident += sum(b for b, w in pieces(part, choice) if w is _R)
        if part.phase is None:
            resident += swapped
        elif part.phase == phase:
            items.append((f"{name} swapped in", swapped))
            items.append((f"{name} streaming slots", (choice.depth + 1) * widest))
    acts = [p.act for p in ctx.parts.values() if p.phase == phase]
    items.append(("activations", max(acts, default=0)))
    items.sort(key=lambda item: -item[1])
    allocated = resident + sum(n for _label, n in items)
    return [
        ("resident weights", resident),
        *items,
        (
            "allocator cache",
            reserved_bytes(allocated, ctx.device.expandable_segments, ctx.device.replacing) - allocated,
        ),
    ]


def _budget_error(ctx: PlanContext, choices: Mapping[str, Choice], budget: int | None) -> BudgetError:
    """A :class:`BudgetError` for the leanest placement the mode allows, naming its fullest phase."""
    outcome = ctx.evaluate(choices)
    phase = max(outcome.raw_peaks, key=outcome.raw_peaks.__getitem__)
    held = " + ".join(f"{label} {format_size(n)}" for label, n in _phase_items(ctx, choices, phase) if n)
    mode = ctx.config.mode
    least = reserved_bytes(outcome.peak, ctx.device.expandable_segments, ctx.device.replacing)
    fixes = [
        f"raise vram_budget (--vram-budget) to at least {format_size(least, up=True)}",
        "free device memory",
    ]
    if mode is not OffloadMode.AUTO:
        fixes.append("use mode='auto' (--offload auto), which streams and swaps to fit the budget")
    if phase == ENCODER_PHASE:
        whole = "" if mode is OffloadMode.AUTO else f": in mode '{mode}' an encoder must fit whole"
        fixes.append(f"encode prompts elsewhere or use a smaller (quantised) text encoder{whole}")
    elif phase == VAE_PHASE:
        fixes.append(
            "lower the resolution or decode in tiles (vae.enable_tiling()) to shrink the decode workspace"
        )
    elif phase in ctx.parts and ctx.parts[phase].size.block_bytes:
        fixes.append("lower the resolution or batch to shrink the activations")
    phase_name = "text-encoder" if phase == ENCODER_PHASE else "VAE" if phase == VAE_PHASE else f"{phase!r}"
    return BudgetError(
        f"{ctx.inventory.pipeline_class}: vram_budget {format_size(budget or 0)} is below the {format_size(least, up=True)} "
        f"that mode '{mode}' needs at the least; its {phase_name} phase holds {held}. "
        f"Fix: {'; or '.join(fixes)}."
    )


def _budget_note(ctx: PlanContext, budget: int | None, budget_text: str) -> str:
    if budget is None or ctx.budget is None:
        return f"budget: {budget_text}"
    allowance = budget - ctx.budget
    return (
        f"budget: {format_size(budget)} ({budget_text}); plans allocate up to {format_size(ctx.budget)}, "
        f"leaving {format_size(allowance)} to the caching allocator"
        + (" (expandable segments)" if ctx.device.expandable_segments else "")
    )


def _notes(
    ctx: PlanContext,
    choices: Mapping[str, Choice],
    out: Outcome,
    budget: int | None,
    budget_text: str,
    assumed: bool,
) -> list[str]:
    dev, work = ctx.device, ctx.workload
    frames = f"×{work.num_frames} frames" if work.num_frames > 1 else ""
    notes = [
        _budget_note(ctx, budget, budget_text),
        f"device: {dev.name}, {dev.h2d_bytes_per_s / 1e9:.1f} GB/s host→device, {dev.flops_per_s / 1e12:.0f} TFLOP/s"
        + (" (assumed: pass device= for another GPU, --gpu on the command line)" if assumed else ""),
        f"workload: {work.width}×{work.height}{frames}, batch {work.batch}, {work.steps} steps × {work.cfg} call(s)",
    ]
    for name, part in ctx.parts.items():
        if isinstance(part.size.shape, DitShape):
            seq = work.sequence_of(part.size.shape) * work.batch
            notes.append(
                f"{name}: {seq} tokens per call (copies hide behind compute above ~{dev.tokens_for_free_streaming:,.0f})"
            )
    notes.append("peak by phase: " + ", ".join(f"{p} {format_size(v)}" for p, v in out.phase_peaks.items()))
    if out.load_bytes:
        notes.append(
            f"swapped in per request: {format_size(out.load_bytes)} ({out.load_bytes / dev.h2d_bytes_per_s:.2f} s, "
            f"{out.hidden_s:.2f} s of it behind compute); encoder and VAE compute are not in the request time"
        )
    streamed = [n for n, c in choices.items() if ctx.parts[n].size.role == "encoder" and _T in c.blocks]
    if streamed:
        notes.append(
            f"encoder blocks streamed: {', '.join(streamed)} (their copies add {out.encoder_stall_s:.2f} s "
            "per request beyond the encoders' compute)"
        )
    missing = sorted(set(ctx.config.keep_resident) - set(ctx.parts))
    if missing:
        notes.append(f"keep_resident names no component: {', '.join(missing)} (ignored)")
    return notes


def default_workload(inventory: Inventory) -> Workload:
    """The request to plan for when none is given: 480×832, 81 frames, 50 steps with two CFG calls for a video
    DiT (Wan's defaults); 1024², 28 steps, one call per step otherwise (Flux.1-dev's)."""
    video = any(isinstance(c.shape, DitShape) and c.shape.temporal_factor > 1 for c in inventory.components)
    if video:
        return Workload(height=480, width=832, num_frames=81, cfg=2, steps=50)
    return Workload()


def plan(
    inventory: Inventory,
    config: OffloadConfig,
    *,
    device: DeviceProfile | None = None,
    workload: Workload | None = None,
    free_bytes: int | None = None,
    measured: Measurements | None = None,
    device_name: str | None = None,
    compression_ratios: Mapping[str, float] | None = None,
    mapped: Mapping[str, tuple[bool, ...]] | None = None,
) -> Plan:
    """Place every component and DiT block for ``config.mode`` within the budget.

    Args:
        inventory: the pipeline's sizes (:func:`inventory_of`).
        config: the mode, ``vram_budget``, ``safety_margin``, ``keep_resident``, ``prefetch_depth`` and
            ``prefetch_components`` are read.
        device: the device's speeds and memory (:func:`~vramferry.planning.devices.profile_from`); default: the h100
            preset for timings, and no memory limit of its own.
        workload: the request the plan is sized for; default :func:`default_workload`.
        free_bytes: free device memory now; the base of ``"80%"`` and of an unset budget.
        measured: block times measured on ``device_name`` (a handle's :attr:`~vramferry.api.OffloadHandle.
            measurements`): they replace the cost model's estimates where the workload gives none, scaled from
            the nearest measured shape; the plan's notes say where each DiT's times came from.
        device_name: the name the measurements were recorded under (``torch.cuda.get_device_name``); default:
            the device profile's name.
        compression_ratios: per component, the fraction of its bytes lossless compression keeps (estimated
            from its weights, :func:`vramferry.runtime.codecs.estimated_ratios`); components left out get their
            dtype's default. Giving it (even empty) says a codec is available: ``compression="auto"`` then
            compresses where it predicts a faster request; without it only ``"lossless"`` compresses (with the
            defaults). The plan's notes give the choice and the predicted gain.
        mapped: the pieces a host store already leaves mapped in their checkpoint files
            (:attr:`ComponentPlan.mapped`), priced as they are; ``None``: with ``host_memory_limit`` below the
            host store's bytes, the pieces that move least often are mapped (:mod:`~vramferry.planning.tiers`).

    Returns:
        A :class:`Plan` with its predicted peak, step and request times.

    Raises:
        BudgetError: the budget is below the least the mode needs; the message gives that least in GiB.
        PlanError: a relative budget without a known memory, or measured block times that do not match.
    """
    ctx, budget, budget_text, notes = _context(
        inventory, config, device, workload, free_bytes, measured, device_name
    )
    if mapped:
        ctx = PlanContext(inventory, config, ctx.device, ctx.workload, ctx.budget, mapped=dict(mapped))
    choices = _search(ctx)
    outcome = ctx.evaluate(choices)
    if not ctx.fits(outcome.peak):
        raise _budget_error(ctx, choices, budget)
    ctx, choices, outcome, codec_notes = _with_codec(ctx, choices, outcome, compression_ratios)
    ctx, choices, outcome, host_notes = _with_host(ctx, choices, outcome, mapped)
    return _finish(
        ctx,
        choices,
        outcome,
        budget,
        (*_notes(ctx, choices, outcome, budget, budget_text, device is None), *notes, *codec_notes, *host_notes),
    )


def _host_limit(config: OffloadConfig) -> int | None:
    value = config.host_memory_limit
    return parse_bytes(value, what="host_memory_limit") if value is not None else None


def _with_host(
    ctx: PlanContext,
    choices: dict[str, Choice],
    outcome: Outcome,
    fixed: Mapping[str, tuple[bool, ...]] | None,
) -> tuple[PlanContext, dict[str, Choice], Outcome, tuple[str, ...]]:
    """The context priced with the pieces left mapped in their files: ``fixed`` ones (a host store already
    packed), or those :func:`~vramferry.planning.tiers.map_pieces` picks to meet ``host_memory_limit``. When it
    picks them in auto mode, the placement is searched once more with them priced (copies from mapped pieces are
    slower, so it may keep other pieces resident), and the faster of the two is kept."""
    limit = _host_limit(ctx.config)
    if fixed is None and limit is None:
        held = format_size(host_bytes(ctx, choices))
        return ctx, choices, outcome, (f"host: {held} in the host store (no host_memory_limit)",)
    flags, over = (dict(fixed), 0) if fixed is not None else map_pieces(ctx, choices, limit)
    if flags != ctx.mapped:
        base, ctx = ctx, _mapped_context(ctx, flags)
        outcome = ctx.evaluate(choices)
        if fixed is None and ctx.config.mode is OffloadMode.AUTO:
            again = _search(ctx)
            flags2, over2 = map_pieces(base, again, limit)
            ctx2 = _mapped_context(base, flags2)
            outcome2 = ctx2.evaluate(again)
            if ctx2.fits(outcome2.peak) and outcome2.request_s < outcome.request_s:
                ctx, choices, outcome, over = ctx2, again, outcome2, over2
    if limit is None:
        return ctx, choices, outcome, ()
    return ctx, choices, outcome, (host_note(ctx, choices, ctx.mapped, limit, over),)


def _mapped_context(ctx: PlanContext, mapped: dict[str, tuple[bool, ...]]) -> PlanContext:
    return PlanContext(ctx.inventory, ctx.config, ctx.device, ctx.workload, ctx.budget, ctx.ratios, mapped)


def _search(ctx: PlanContext) -> dict[str, Choice]:
    return plan_auto(ctx) if ctx.config.mode is OffloadMode.AUTO else _plan_fixed(ctx)


def _with_codec(
    ctx: PlanContext, choices: dict[str, Choice], outcome: Outcome, measured: Mapping[str, float] | None
) -> tuple[PlanContext, dict[str, Choice], Outcome, tuple[str, ...]]:
    """The raw plan, or the plan made again with compressed moves where the config asks for it (``lossless``) or
    it predicts a faster request (``auto``, when a codec is available: ``measured`` given)."""
    config = ctx.config
    lossless = config.compression is Compression.LOSSLESS
    if config.mode is OffloadMode.NONE or not (
        lossless or measured is not None and wanted(config.compression, True)
    ):
        return ctx, choices, outcome, ()
    if not lossless and all(c.placement is _R and _S not in c.blocks and _T not in c.blocks for c in choices.values()):
        # Nothing crosses the link per request: no gain to predict, and the weights' histograms go unread.
        return ctx, choices, outcome, ("compression: off, every weight stays resident",)
    estimate = codec_estimate(ctx.inventory, measured)
    if not estimate.ratios:
        return ctx, choices, outcome, ("compression: off (no component of 16-bit or 32-bit plain weights)",)
    cctx = PlanContext(ctx.inventory, config, ctx.device, ctx.workload, ctx.budget, dict(estimate.ratios), ctx.mapped)
    cchoices = _search(cctx)
    cout = cctx.evaluate(cchoices)
    gain = outcome.request_s / cout.request_s if cout.request_s > 0 else 1.0
    where = ", ".join(
        f"{name} {ratio:.3f} ({estimate.sources[name]})" for name, ratio in estimate.ratios.items()
    )
    decode = f"decode {ctx.device.decode_bytes_per_s / 1e9:.0f} GB/s on {ctx.device.name}"
    compare = (
        f"predicted step {cout.step_s:.3f} s vs {outcome.step_s:.3f} s raw, request {cout.request_s:.2f} s vs "
        f"{outcome.request_s:.2f} s ({gain:.2f}x)"
    )
    if not cctx.fits(cout.peak) or not keep_compressed(config.compression, outcome.request_s, cout.request_s):
        return ctx, choices, outcome, (f"compression: off, no predicted gain: {compare}; ratios {where}",)
    return cctx, cchoices, cout, (f"compression: lossless, {compare}; ratios {where}; {decode}",)


def price(
    placed: Plan,
    inventory: Inventory,
    config: OffloadConfig,
    *,
    device: DeviceProfile | None = None,
    workload: Workload | None = None,
    free_bytes: int | None = None,
    measured: Measurements | None = None,
    device_name: str | None = None,
) -> Plan | None:
    """The placements of ``placed`` priced for another ``workload`` (the arguments as for :func:`plan`): a plan
    with the same placements and fresh predictions and schedule, or ``None`` when they do not fit the budget
    under that workload (its activations, above all)."""
    ctx, budget, budget_text, notes = _context(
        inventory, config, device, workload, free_bytes, measured, device_name
    )
    ratios = {c.name: c.codec_ratio for c in placed.components if c.codec == LOSSLESS}
    mapped = {c.name: c.mapped for c in placed.components if any(c.mapped)}
    if ratios or mapped:
        ctx = PlanContext(inventory, config, ctx.device, ctx.workload, ctx.budget, ratios, mapped)
    choices = {}
    for size in inventory.components:
        cplan = placed.get(size.name)
        blocks = cplan.blocks or (cplan.placement,) * len(size.block_bytes)
        choices[size.name] = Choice(cplan.placement, blocks, cplan.prefetch_depth)
    outcome = ctx.evaluate(choices)
    if not ctx.fits(outcome.peak):
        return None
    kept = f"placement kept from the plan for another shape ({placed.predicted_peak_bytes or 0} B peak there)"
    return _finish(
        ctx,
        choices,
        outcome,
        budget,
        (*_notes(ctx, choices, outcome, budget, budget_text, device is None), *notes, kept),
    )


def _context(inventory, config, device, workload, free_bytes, measured, device_name):
    """The cost model for one planning call, the budget, where it came from, and notes on measured times."""
    profile = device if device is not None else profile_from()
    helpers = len(config.helper_devices)
    link_notes: tuple[str, ...] = ()
    if helpers and len(profile.helper_bytes_per_s) != helpers:
        # Not measured here (no such GPUs, or a dry run): each helper's link assumed as fast as this device's.
        profile = dataclasses.replace(profile, helper_bytes_per_s=(profile.h2d_bytes_per_s,) * helpers)
        link_notes = ("links: helper bandwidths not measured; each assumed equal to the device's",)
    if helpers:
        rates = " + ".join(f"{r / 1e9:.1f}" for r in profile.helper_bytes_per_s)
        link_notes = (
            *link_notes,
            f"links: raw streamed blocks cross at {profile.stream_bytes_per_s / 1e9:.1f} GB/s "
            f"({profile.h2d_bytes_per_s / 1e9:.1f} own + {rates} by {', '.join(config.helper_devices)})",
        )
    work = workload if workload is not None else default_workload(inventory)
    sources: dict[str, str] = {}
    if measured is not None:
        device_name = device_name or profile.name
        work, sources = with_measured_times(work, inventory, measured, device_name, profile)
    budget, budget_text = resolve_budget(config, device=device, free_bytes=free_bytes)
    # Plans place allocations; the caching allocator reserves a little more (see reserved_bytes).
    allocatable = (
        None if budget is None else allocatable_bytes(budget, profile.expandable_segments, profile.replacing)
    )
    ctx = PlanContext(inventory, config, profile, work, allocatable)
    notes = tuple(f"{name}: block compute {source} on {device_name}" for name, source in sources.items())
    return ctx, budget, budget_text, (*notes, *link_notes)


def _finish(
    ctx: PlanContext,
    choices: Mapping[str, Choice],
    outcome: Outcome,
    budget: int | None,
    notes: Sequence[str],
) -> Plan:
    inventory, config = ctx.inventory, ctx.config
    expandable = (ctx.device.expandable_segments, ctx.device.replacing)
    components = []
    for size in inventory.components:
        choice = choices[size.name]
        depth = choice.depth if _T in choice.blocks else 0
        # An encoder kept whole is one unit: its blocks go where its placement says.
        blocks = () if size.role == "encoder" and not depth else choice.blocks
        ratio = ctx.ratios.get(size.name, 1.0)
        moves = any(where is not _R for where in (choice.placement, *choice.blocks))
        codec = ("lossless", ratio) if ratio < 1.0 and moves else ("raw", 1.0)
        components.append(
            ComponentPlan(
                size.name, size.role, size.bytes, choice.placement, blocks, depth, *codec, ctx.mapped.get(size.name, ())
            )
        )
    activations = max((p.act for p in ctx.parts.values()), default=0)
    weights = None if budget is None else max(0, allocatable_bytes(budget, *expandable) - activations)
    the_plan = Plan(
        mode=config.mode,
        components=tuple(components),
        budget_bytes=budget,
        predicted_peak_bytes=reserved_bytes(outcome.peak, *expandable),
        predicted_step_s=outcome.step_s,
        predicted_request_s=outcome.request_s,
        notes=tuple(notes),
        activation_bytes=activations,
        weight_budget_bytes=weights,
        exclusive=config.exclusive,
        host_limit_bytes=_host_limit(config),
    )
    return with_schedule(the_plan, inventory, config)


def transition_bytes(old: Plan, new: Plan, inventory: Inventory) -> int:
    """Bytes that moving from ``old`` to ``new`` copies: the pieces (non-block parts and blocks) resident in
    ``new`` but not in ``old``. Pieces that stop being resident cost nothing (their host copy is canonical)."""
    total = 0
    for size in inventory.components:
        before, after = old.get(size.name), new.get(size.name)
        pieces = [size.rest_bytes if size.block_bytes else size.bytes, *size.block_bytes]
        was, now = (_resident_pieces(c, len(size.block_bytes)) for c in (before, after))
        total += sum(b for b, w, n in zip(pieces, was, now, strict=True) if n and not w)
    return total


def keep_placement(kept_s: float | None, new_s: float, switch_s: float, lost_s: float) -> float | None:
    """Whether to keep the current placement for a request shape rather than switch to that shape's own plan:
    a rent-or-buy rule, so that alternating shapes do not thrash and a run of one shape still switches.

    Args:
        kept_s: the predicted request seconds of the current placement at this shape; ``None``: it does not fit.
        new_s: the predicted request seconds of the shape's own plan.
        switch_s: what switching costs: the bytes becoming resident over the host→device bandwidth.
        lost_s: the seconds lost so far by keeping the current placement at this shape.

    Returns:
        The seconds lost once this request is counted when keeping is cheaper so far (at most ``switch_s``
        lost, then switching, costs at most twice the best choice made in hindsight); ``None``: switch.
    """
    if kept_s is None:
        return None
    lost = lost_s + max(0.0, kept_s - new_s)
    return lost if lost <= switch_s else None


def _resident_pieces(cplan: ComponentPlan, blocks: int) -> list[bool]:
    """Whether the non-block part, then each block, is resident under ``cplan``."""
    placements = cplan.blocks or (cplan.placement,) * blocks
    return [p is _R for p in (cplan.placement, *placements)]


def with_schedule(the_plan: Plan, inventory: Inventory, config: OffloadConfig) -> Plan:
    """``the_plan`` with the schedule of its placements (:func:`~vramferry.planning.schedule.build_schedule`)
    for the request order of ``inventory`` and the prefetch setting of ``config``."""
    items = [_movable(size, the_plan.get(size.name)) for size in inventory.components]
    schedule = build_schedule(
        items,
        inventory.order,
        weight_budget=the_plan.weight_budget_bytes,
        prefetch=config.prefetch_components,
        exclusive=the_plan.exclusive,
    )
    return dataclasses.replace(the_plan, schedule=schedule)


def _movable(size: ComponentSize, cplan: ComponentPlan) -> Movable:
    """What the schedule needs of one placed component: its resident, swapped and slot bytes."""
    if cplan.blocks:
        placed = [(size.rest_bytes, cplan.placement), *zip(size.block_bytes, cplan.blocks, strict=True)]
    else:
        placed = [(size.bytes, cplan.placement)]
    resident = sum(b for b, where in placed if where is _R)
    swapped = sum(b for b, where in placed if where is _S)
    widest = max((b for b, where in placed if where is _T), default=0)
    if phase_of(size.name, size.role) is None:  # loaded at first use and kept, like the resident parts
        return Movable(size.name, size.role, resident_bytes=resident + swapped)
    depth = min(cplan.prefetch_depth, max(1, cplan.streamed_blocks - 1))
    slots = (depth + 1) * widest if widest else 0
    return Movable(size.name, size.role, swapped, slots, resident)
