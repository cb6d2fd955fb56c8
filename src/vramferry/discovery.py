"""Find a pipeline's modules and their roles: the protocol, else diffusers' components, else a name scan."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from torch import nn


class Role(str, Enum):
    DIT = "dit"
    ENCODER = "encoder"
    VAE = "vae"
    RESIDENT = "resident"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Component:
    """One collected module.

    Attributes:
        name: the attribute path it was found under (``"transformer"``, ``"language_model.model"``).
        module: the module itself.
        role: its role.
        source: how it was found: ``"declared"``, ``"components"`` (diffusers), ``"scan"`` or ``"others"``.
        aliases: other paths that reach the same module (collected once).
        absorbed: paths of collected-looking modules nested inside this one (the outermost owns them).
    """

    name: str
    module: nn.Module = field(repr=False, compare=False)
    role: Role
    source: str
    aliases: tuple[str, ...] = ()
    absorbed: tuple[str, ...] = ()


@dataclass(frozen=True)
class BlockSet:
    """A DiT's repeated blocks, in execution order.

    Attributes:
        dit: the owning DiT's component name.
        attrs: the attributes of the DiT that hold the blocks, in order (``("transformer_blocks",
            "single_transformer_blocks")``).
        names: each block's path inside the DiT (``"transformer_blocks.0"``).
        blocks: the block modules.
        found_by: ``"declared"`` (a class attribute on the DiT), ``"config"`` (``OffloadConfig.block_attrs``),
            or ``"heuristic"``.
    """

    dit: str
    attrs: tuple[str, ...]
    names: tuple[str, ...]
    blocks: tuple[nn.Module, ...] = field(repr=False, compare=False)
    found_by: str


@dataclass
class PipelineModules:
    """What discovery found. Every module of the pipeline that owns weights sits in exactly one list.

    Attributes:
        pipeline_class: the pipeline's class name, for messages.
        source: ``"protocol"``, ``"diffusers"`` or ``"scan"``.
        dits, encoders, vaes, resident, others: the components by role, in declaration/pipeline order.
        blocks: per DiT name, its blocks (absent for a DiT without repeated blocks).
        warnings: every warning discovery emitted, in order.
    """

    pipeline_class: str
    source: str
    dits: list[Component] = field(default_factory=list)
    encoders: list[Component] = field(default_factory=list)
    vaes: list[Component] = field(default_factory=list)
    resident: list[Component] = field(default_factory=list)
    others: list[Component] = field(default_factory=list)
    blocks: dict[str, BlockSet] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def components(self) -> list[Component]:
        """All components: dits, encoders, vaes, resident, others."""
        return [*self.dits, *self.encoders, *self.vaes, *self.resident, *self.others]

    def get(self, name: str) -> Component:
        for component in self.components():
            if component.name == name or name in component.aliases:
                return component
        raise KeyError(name)


def discover(pipeline: object, *, strict: bool = False, block_attrs: dict | None = None) -> PipelineModules:
    """Collect ``pipeline``'s modules by role. (Implemented below.)"""
    raise NotImplementedError
