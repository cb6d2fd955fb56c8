"""Images per second by batch size: under offload a step costs about max(compute, streamed bytes ÷ bandwidth),
and the streamed bytes do not grow with the batch, so a larger batch is nearly free until compute overtakes the
transfers (the knee), or until its activations no longer fit the budget."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import BudgetError
from ..units import format_bytes
from .plan import Plan
from .workload import Workload

#: A larger batch is worth it while it raises images per second by at least this fraction.
MIN_GAIN = 0.05


@dataclass(frozen=True)
class BatchPoint:
    """The plan's prediction for one batch size; ``error`` says why the batch does not fit (then no figures)."""

    batch: int
    step_s: float | None = None
    request_s: float | None = None
    peak_bytes: int | None = None
    error: str | None = None

    @property
    def images_per_s(self) -> float | None:
        return self.batch / self.request_s if self.request_s else None


def throughput(plan_for: Callable[[Workload], Plan], workload: Workload, max_batch: int) -> list[BatchPoint]:
    """Plan ``workload`` at batch 1 to ``max_batch``; stops at the first batch that does not fit.

    Args:
        plan_for: plans one workload (the planner with the config and device of the caller).
        workload: the request shape; its ``batch`` is replaced.
        max_batch: the largest batch to try.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch: must be ≥ 1, got {max_batch}")
    points = []
    for batch in range(1, max_batch + 1):
        try:
            made = plan_for(dataclasses.replace(workload, batch=batch))
        except BudgetError as exc:
            points.append(BatchPoint(batch, error=str(exc).split(". ")[0]))
            break
        points.append(
            BatchPoint(batch, made.predicted_step_s, made.predicted_request_s, made.predicted_peak_bytes)
        )
    return points


def best_batch(points: list[BatchPoint], min_gain: float = MIN_GAIN) -> int:
    """The largest batch that fits and whose images per second still rose by ``min_gain`` over the batch
    before it (the knee of the curve); 1 when nothing fits beyond it."""
    best, rate = 1, None
    for point in points:
        if point.images_per_s is None:
            break
        if rate is None or point.images_per_s >= rate * (1 + min_gain):
            best, rate = point.batch, point.images_per_s
        else:
            break
    return best


def format_throughput(points: list[BatchPoint]) -> str:
    """The curve as a table, the chosen batch marked."""
    chosen = best_batch(points)
    lines = [
        "batch  step       request    images/s  peak",
        "-----  ---------  ---------  --------  ----------",
    ]
    for p in points:
        if p.error is not None:
            lines.append(f"{p.batch:<5}  does not fit: {p.error}")
            continue
        mark = "  <- largest batch still gaining" if p.batch == chosen and len(points) > 1 else ""
        lines.append(
            f"{p.batch:<5}  {p.step_s or 0:7.3f} s  {p.request_s or 0:7.2f} s  {p.images_per_s or 0:8.3f}  "
            f"{format_bytes(p.peak_bytes or 0)}{mark}"
        )
    return "\n".join(lines)
