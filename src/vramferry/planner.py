"""Pure placement planning: sizes, a budget and a cost model in; a :class:`Plan` out. No CUDA calls here."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .config import OffloadMode


class Placement(str, Enum):
    """Where a unit of weights lives.

    RESIDENT: on the device from ``apply`` until ``remove``.
    SWAPPED: on the device while its component runs; dropped (zero bytes moved) when evicted.
    STREAMED: a DiT block copied in just before it runs, into a fixed device slot, and dropped after.
    """

    RESIDENT = "resident"
    SWAPPED = "swapped"
    STREAMED = "streamed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ComponentSize:
    """The weight bytes of one component (planner input).

    Attributes:
        name, role: as discovered.
        bytes: all parameter and buffer bytes of the component, blocks included.
        dtype: the dominant parameter dtype (``"torch.bfloat16"``).
        block_names, block_bytes: a DiT's repeated blocks in execution order, and their bytes.
    """

    name: str
    role: str
    bytes: int
    dtype: str = "torch.float32"
    block_names: tuple[str, ...] = ()
    block_bytes: tuple[int, ...] = ()

    @property
    def rest_bytes(self) -> int:
        """Bytes outside the blocks (embeddings, norms, projections)."""
        return self.bytes - sum(self.block_bytes)


@dataclass(frozen=True)
class Inventory:
    """All components' sizes and the order in which a request runs them."""

    pipeline_class: str
    components: tuple[ComponentSize, ...]
    order: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    def get(self, name: str) -> ComponentSize:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)


@dataclass(frozen=True)
class ComponentPlan:
    """The placement of one component.

    Attributes:
        name, role, bytes: as in the inventory.
        placement: for a component without blocks, where it lives; for a DiT with blocks, where its non-block
            part lives.
        blocks: for a DiT with blocks, one placement per block: ``RESIDENT``, ``SWAPPED`` (loaded together with the
            DiT when it runs) or ``STREAMED``.
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
    """A complete placement, with what the cost model predicts for it."""

    mode: OffloadMode
    components: tuple[ComponentPlan, ...]
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    predicted_step_s: float | None = None
    predicted_request_s: float | None = None
    notes: tuple[str, ...] = field(default=())

    def get(self, name: str) -> ComponentPlan:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)
