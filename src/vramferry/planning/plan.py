""""""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


from dataclasses import fields
from typing import TYPE_CHECKING

from ..config import OffloadMode

if TYPE_CHECKING:
    pass


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
    """

    name: str
    role: str
    bytes: int
    placement: Placement
    blocks: tuple[Placement, ...] = ()
    prefetch_depth: int = 0

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
    """

    mode: OffloadMode
    components: tuple[ComponentPlan, ...]
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    predicted_step_s: float | None = None
    predicted_request_s: float | None = None
    notes: tuple[str, ...] = field(default=())
    activation_bytes: int | None = None

    def get(self, name: str) -> ComponentPlan:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """Plain JSON-ready data; :func:`plan_from_dict` reads it back."""
    data = {f.name: getattr(plan, f.name) for f in fields(Plan)}
    data.update(mode=plan.mode.value, notes=list(plan.notes))
    data["components"] = [
        {f.name: getattr(c, f.name) for f in fields(ComponentPlan)}
        | {"placement": c.placement.value, "blocks": [b.value for b in c.blocks]}
        for c in plan.components
    ]
    return data


def plan_from_dict(data: Mapping[str, Any]) -> Plan:
    """Inverse of :func:`plan_to_dict`."""
    components = tuple(
        ComponentPlan(
            **{**c, "placement": Placement(c["placement"]), "blocks": tuple(map(Placement, c["blocks"]))}
        )
        for c in data["components"]
    )
    return Plan(
        **{**data, "mode": OffloadMode(data["mode"]), "components": components, "notes": tuple(data["notes"])}
    )
