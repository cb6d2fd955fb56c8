"""The plans a served handle holds, as the status route lists them."""

from __future__ import annotations

from typing import Any

from .schemas import PlanSummary


def plan_summaries(handle: Any) -> list[PlanSummary]:
    """Each plan the handle holds, as its request shape, predictions and per-component placement."""
    listed = getattr(handle, "plans", None)
    if not callable(listed):
        return []
    summaries = []
    for work, made in listed():
        placement = {}
        for c in made.components:
            resident = sum(b.value == "resident" for b in c.blocks)
            placement[c.name] = (
                f"{c.placement}, {resident}/{len(c.blocks)} blocks resident" if c.blocks else str(c.placement)
            )
        summaries.append(
            PlanSummary(
                size=f"{work.width}x{work.height}",
                frames=work.num_frames,
                steps=work.steps,
                batch=work.batch,
                predicted_step_s=made.predicted_step_s,
                predicted_peak_bytes=made.predicted_peak_bytes,
                placement=placement,
                current=made.placements == handle.plan.placements,
            )
        )
    return summaries
