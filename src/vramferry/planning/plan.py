"""A plan: where every component and block lives, the schedule that moves them, and what it should cost.

Plain, frozen data: made by :func:`~vramferry.planning.plan`, carried out by the runtime, written to JSON and read
back (:func:`plan_to_dict`, :func:`plan_from_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from ..config import OffloadMode
from .schedule import Phase, Step


class Placement(str, Enum):
    """Where a unit of weights lives.

    RESIDENT: on the device from ``apply`` until ``remove``.
    SWAPPED: on the device while its component runs; dropped (zero bytes moved) when evicted.
    STREAMED: a block (of a DiT or a text encoder) copied in just before it runs, into a fixed device slot,
    and dropped after.
    """

    RESIDENT = "resident"
    SWAPPED = "swapped"
    STREAMED = "streamed"

    def __str__(self) -> str:
        return self.value


RESIDENT, SWAPPED, STREAMED = Placement.RESIDENT, Placement.SWAPPED, Placement.STREAMED


@dataclass(frozen=True)
class ComponentPlan:
    """The placement of one component.

    Attributes:
        name, role, bytes: as in the inventory.
        placement: for a component without blocks, where it lives; for one with blocks, where its non-block
            part lives.
        blocks: for a DiT with blocks, and for an encoder whose blocks are streamed, one placement per block:
            ``RESIDENT``, ``SWAPPED`` (loaded together with the component when it runs) or ``STREAMED``. Empty for
            an encoder kept whole (its blocks go where ``placement`` says).
        prefetch_depth: for streamed blocks, how many blocks are in flight ahead of the running one (the number
            of device slots is ``prefetch_depth + 1``).
        codec: ``"raw"``, or ``"lossless"``: the pieces that move (swapped or streamed) are kept compressed in
            host memory and decoded on the device after the copy; resident pieces stay raw.
        codec_ratio: the fraction of the moved bytes that cross the link (1.0 when raw).
        mapped: which of its pieces (its non-block part, then each block) the host store leaves as views of
            their checkpoint files instead of copying them into page-locked memory (``host_memory_limit`` below
            the weights): their copies to the device run at the pageable bandwidth. Empty: none.
    """

    name: str
    role: str
    bytes: int
    placement: Placement
    blocks: tuple[Placement, ...] = ()
    prefetch_depth: int = 0
    codec: str = "raw"
    codec_ratio: float = 1.0
    mapped: tuple[bool, ...] = ()

    @property
    def streamed_blocks(self) -> int:
        return sum(p is Placement.STREAMED for p in self.blocks)


@dataclass(frozen=True)
class Plan:
    """A complete placement, with what the cost model predicts for it.

    Attributes:
        mode: the configured mode.
        components: one :class:`ComponentPlan` per component, in inventory order.
        budget_bytes: the device-memory budget the plan was made for (``None``: unlimited).
        predicted_peak_bytes: weights, streaming slots and activations at the fullest phase of a request.
        predicted_step_s: DiT seconds per denoising step (all calls of the step).
        predicted_request_s: DiT compute plus weight loads per request, plus the copies of streamed encoder
            blocks that their compute does not hide, less what overlaps compute; text encoder and VAE compute are
            left out (the same for every plan).
        notes: how the budget was found, the phase peaks, what was assumed.
        activation_bytes: the largest activation/workspace estimate of any phase.
        schedule: the phases of one request, in order, with what each loads, prefetches and evicts
            (:mod:`~vramferry.planning.schedule`); the runtime carries it out.
        weight_budget_bytes: device bytes the weights may take at any time (resident parts, swapped parts,
            streaming slots): the budget less the allocator's share and the largest phase's activations, so that
            a prefetch never takes what the plan left to activations. ``None``: no limit.
        exclusive: no ``vram_budget`` was given (:attr:`~vramferry.config.OffloadConfig.exclusive`): streaming
            slots are sized per block rather than uniformly.
        host_limit_bytes: the ``host_memory_limit`` the host side was planned for (``None``: every piece is
            copied into page-locked memory).
    """

    mode: OffloadMode
    components: tuple[ComponentPlan, ...]
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    predicted_step_s: float | None = None
    predicted_request_s: float | None = None
    notes: tuple[str, ...] = field(default=())
    activation_bytes: int | None = None
    schedule: tuple[Phase, ...] = ()
    weight_budget_bytes: int | None = None
    exclusive: bool = True
    host_limit_bytes: int | None = None

    def get(self, name: str) -> ComponentPlan:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def phase(self, name: str) -> Phase:
        """The phase called ``name`` (``"encoders"``, a DiT's name, ``"vaes"``)."""
        for phase in self.schedule:
            if phase.name == name:
                return phase
        raise KeyError(name)

    @property
    def placements(self) -> tuple:
        """What decides where the weights are: each component's placement, blocks and depth, and the schedule.
        Two plans with equal placements differ only in their predictions."""
        where = tuple((c.name, c.placement, c.blocks, c.prefetch_depth) for c in self.components)
        return where, self.schedule, self.exclusive


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """Plain JSON-ready data; :func:`plan_from_dict` reads it back."""
    data = {f.name: getattr(plan, f.name) for f in fields(Plan)}
    data.update(mode=plan.mode.value, notes=list(plan.notes))
    data["components"] = [
        {f.name: getattr(c, f.name) for f in fields(ComponentPlan)}
        | {"placement": c.placement.value, "blocks": [b.value for b in c.blocks], "mapped": list(c.mapped)}
        for c in plan.components
    ]
    data["schedule"] = [
        {
            "name": phase.name,
            "evict": list(phase.evict),
            "steps": [
                {
                    "component": s.component,
                    "evict": list(s.evict),
                    "load": s.load,
                    "prefetch": list(s.prefetch),
                }
                for s in phase.steps
            ],
        }
        for phase in plan.schedule
    ]
    return data


def plan_from_dict(data: Mapping[str, Any]) -> Plan:
    """Inverse of :func:`plan_to_dict`."""
    components = tuple(
        ComponentPlan(
            **{
                **c,
                "placement": Placement(c["placement"]),
                "blocks": tuple(map(Placement, c["blocks"])),
                "mapped": tuple(bool(m) for m in c.get("mapped", ())),
            }
        )
        for c in data["components"]
    )
    schedule = tuple(
        Phase(
            p["name"],
            tuple(p["evict"]),
            tuple(
                Step(s["component"], tuple(s["evict"]), bool(s["load"]), tuple(s["prefetch"]))
                for s in p["steps"]
            ),
        )
        for p in data.get("schedule", ())
    )
    return Plan(
        **{
            **data,
            "mode": OffloadMode(data["mode"]),
            "components": components,
            "notes": tuple(data["notes"]),
            "schedule": schedule,
        }
    )
