"""A plan as a readable table."""

from __future__ import annotations

import math

from ..discovery.inventory import ComponentSize, Inventory
from ..units import format_bytes
from .plan import ComponentPlan, Placement, Plan
from .schedule import Phase


def format_size(nbytes: float, up: bool = False) -> str:
    """A budget, peak or phase size: GiB with two decimals, the unit budgets are written in, down to a tenth of
    a GiB; smaller sizes in MiB, KiB or bytes, where two decimals of GiB would hide them (1 MiB is not
    ``0.00 GiB``). ``up`` rounds up to the digits shown, for a least budget that must be enough."""
    for unit, scale, floor in (("GiB", 2**30, 2**30 / 10), ("MiB", 2**20, 2**20), ("KiB", 2**10, 2**10)):
        if abs(nbytes) >= floor:
            value = math.ceil(nbytes / scale * 100) / 100 if up else nbytes / scale
            return f"{value:.2f} {unit}"
    return f"{math.ceil(nbytes) if up else int(nbytes)} B"


def _blocks_summary(cplan: ComponentPlan, size: ComponentSize | None) -> str:
    if not cplan.blocks:
        return ""
    parts = [f"{sum(b is p for b in cplan.blocks)} {p}" for p in Placement if p in cplan.blocks]
    text = " / ".join(parts)
    if cplan.streamed_blocks:
        text += f", depth {cplan.prefetch_depth}"
        if size is not None and len(size.block_bytes) == len(cplan.blocks):
            widest = max(
                b for b, p in zip(size.block_bytes, cplan.blocks, strict=True) if p is Placement.STREAMED
            )
            text += f" ({cplan.prefetch_depth + 1} slots × {format_bytes(widest)})"
    return text


def format_plan(plan: Plan, inventory: Inventory | None = None) -> str:
    """A readable table of the plan: one row per component, then the predictions and the notes."""
    sizes = {c.name: c for c in inventory.components} if inventory is not None else {}
    rows = [("component", "role", "size", "placement", "blocks")]
    for c in plan.components:
        where = f"{c.placement} (non-block part)" if c.blocks else str(c.placement)
        if c.codec != "raw":
            where += f", moved {c.codec} ×{c.codec_ratio:.2f}"
        size = sizes.get(c.name)
        stored = (
            f" ({'/'.join(size.formats)}, {size.dtype.removeprefix('torch.')})"
            if size and size.formats
            else ""
        )
        rows.append((c.name, c.role, format_bytes(c.bytes) + stored, where, _blocks_summary(c, size)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"plan: mode {plan.mode.value}, budget "
        + (format_size(plan.budget_bytes) if plan.budget_bytes else "unlimited")
    ]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    predicted = [
        f"{label} {fmt(value)}"
        for label, value, fmt in (
            ("peak", plan.predicted_peak_bytes, format_size),
            ("step", plan.predicted_step_s, lambda v: f"{v:.3f} s"),
            ("request", plan.predicted_request_s, lambda v: f"{v:.2f} s"),
        )
        if value is not None
    ]
    if predicted:
        lines.append("predicted: " + ", ".join(predicted))
    if plan.schedule:
        lines.append("schedule (one request):")
        lines.extend(f"  {format_phase(phase)}" for phase in plan.schedule)
    lines.extend(f"  - {note}" for note in plan.notes)
    return "\n".join(lines)


def format_phase(phase: Phase) -> str:
    """One line: ``vaes: drops transformer; vae (prefetches text_encoder)``."""
    steps = []
    for step in phase.steps:
        acts = (["drops " + ", ".join(step.evict)] if step.evict else []) + (["loads"] if step.load else [])
        acts += ["prefetches " + ", ".join(step.prefetch)] if step.prefetch else []
        steps.append(step.component + (f" ({'; '.join(acts)})" if acts else ""))
    begin = f"drops {', '.join(phase.evict)}; " if phase.evict else ""
    return f"{phase.name}: {begin}{', '.join(steps)}"
