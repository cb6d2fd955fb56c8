"""What an offload handle plans with, and how it makes and caches plans: pure, no CUDA calls."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import Compression, OffloadConfig
from .calibrate import Measurements, measurement_basis, with_measured_times
from .devices import profile_from
from .plan import Plan

logger = logging.getLogger(__name__)


@dataclass
class _Planning:
    """What a handle plans with: the pipeline's sizes, the device, and the request shape of the current plan.

    Attributes:
        sources: per DiT, where the current plan's block times came from (``"measured"``, ``"scaled from ..."``);
            DiTs planned on the cost model's estimates are absent.
        recorded: DiTs whose measured times under ``workload`` were kept in ``measured``.
        plans: plans made so far, per request shape and the measured inputs they were planned with.
        losses: per request shape, the predicted seconds lost so far by keeping the current placement there
            instead of switching to the shape's own plan.
    """

    inventory: Any
    profile: Any
    free: int | None
    workload: Any
    device_name: str
    measured: Measurements
    sources: dict[str, str] = field(default_factory=dict)
    recorded: set[str] = field(default_factory=set)
    plans: dict[tuple, tuple[Plan, dict[str, str], Any]] = field(default_factory=dict)
    losses: dict[tuple, float] = field(default_factory=dict)  # request seconds lost by keeping a placement
    ratios: dict[str, float] | None = None  # compression ratios per component; None: no codec available
    # Once the host store is packed: per component the fraction of its bytes the store keeps (1.0: raw). Later
    # plans keep each component's codec, which only a new apply could change.
    packed: dict[str, float] | None = None
    # Once packed: per component, which pieces the host store left mapped in their checkpoint files (kept).
    mapped: dict[str, tuple[bool, ...]] | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # how long apply's decisions took, by step
    links: list = field(default_factory=list)  # helper GPUs: (device, another device?, bytes per second added)
    # The current plan was given (apply(plan=...), replan(plan=...)): a change of sizes keeps its placements.
    given: bool = False

    @property
    def plan_profile(self) -> Any:
        """The device profile later plans are made with: once packed, a handle's plans are ones it re-places
        to."""
        if self.profile is None or self.packed is None:
            return self.profile
        return replace(self.profile, replacing=True)

    def pack(self, plan: Plan) -> None:
        """Record the codecs the host store was packed with for ``plan``."""
        self.packed = {c.name: c.codec_ratio if c.codec == "lossless" else 1.0 for c in plan.components}
        self.mapped = {c.name: c.mapped for c in plan.components if any(c.mapped)}

    def pack_mapped(self, mapped: dict[str, tuple[bool, ...]]) -> None:
        """Record which pieces the host store really left mapped (a piece that is not a clean file view is
        packed instead)."""
        self.mapped = {name: flags for name, flags in mapped.items() if any(flags)}


def _first_plan(planning: _Planning, config: OffloadConfig, work: Any, missing: str | None) -> Plan:
    """The plan ``apply`` starts with; one info line when ``compression="auto"`` would have compressed, had the
    codec's package been installed (``missing`` says which)."""
    the_plan, planning.sources = _make_plan(planning, config, work)
    if missing is not None:
        would = _make_plan(replace(planning, ratios={}), config, work)[0]
        if any(c.codec == "lossless" for c in would.components):
            logger.info("vramferry: compression='auto' would compress moved weights here (%s)", missing)
    return the_plan


def _measured_inputs(planning: _Planning, workload: Any) -> tuple:
    """Which measurements a plan for ``workload`` is made with: per DiT, the measured request shape its block
    times come from (its own, or the nearest measured one), and the measured bandwidths. A shape measured again
    (each visit measures afresh) keeps its plans: the times of one shape barely move between measurements."""
    bases = []
    for size in planning.inventory.components:
        if size.role == "dit" and size.block_bytes and size.name not in workload.block_compute_s:
            basis = measurement_basis(planning.measured, planning.device_name, size, workload)
            bases.append((size.name, basis))
    given = tuple(sorted(workload.block_compute_s.items()))
    return tuple(bases), given, tuple(sorted(planning.measured.h2d_bytes_per_s.items()))


def _make_plan(planning: _Planning, config: OffloadConfig, workload: Any) -> tuple[Plan, dict[str, str]]:
    """A plan for ``workload`` with the block times measured on this device where there are any."""
    from .planner import plan as make_plan

    _work, sources = with_measured_times(
        workload,
        planning.inventory,
        planning.measured,
        planning.device_name,
        planning.profile or profile_from(),
    )
    ratios, profile = planning.ratios, planning.plan_profile
    if planning.packed is not None:
        ratios = planning.packed  # a raw component (1.0) is not worth compressing: it stays raw
        kept = Compression.LOSSLESS if any(r < 1.0 for r in ratios.values()) else Compression.OFF
        config = config.replace(compression=kept)
    the_plan = make_plan(
        planning.inventory,
        config,
        device=profile,
        workload=workload,
        free_bytes=planning.free,
        measured=planning.measured,
        device_name=planning.device_name,
        compression_ratios=ratios,
        mapped=planning.mapped if planning.packed is not None else None,
    )
    return the_plan, sources
