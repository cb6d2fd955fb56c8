"""What discovery returns: roles, components and the pipeline's modules by role."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from torch import nn

from .blocks import BlockSet, find_encoder_blocks


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


@dataclass
class PipelineModules:
    """What discovery found. Every module of the pipeline that owns weights sits in exactly one list.

    Attributes:
        pipeline_class: the pipeline's class name, for messages.
        source: ``"protocol"``, ``"diffusers"`` or ``"scan"``.
        dits, encoders, vaes, resident, others: the components by role, in declaration/pipeline order.
        blocks: per DiT name, its blocks (absent for a DiT without repeated blocks).
        encoder_blocks: per encoder name, its repeated layers (T5's ``encoder.block``, CLIP's
            ``encoder.layers``, a VLM's ``visual.blocks`` and ``language_model.layers``); absent for an encoder
            without them. The planner may stream them when an encoder does not fit whole.
        warnings: every warning discovery emitted, in order.
        order: component names in the order a request runs them (see :func:`~vramferry.discovery.discover`);
            empty for a ``PipelineModules`` assembled by hand (then encoders, DiTs, VAEs).
    """

    pipeline_class: str
    source: str
    dits: list[Component] = field(default_factory=list)
    encoders: list[Component] = field(default_factory=list)
    vaes: list[Component] = field(default_factory=list)
    resident: list[Component] = field(default_factory=list)
    others: list[Component] = field(default_factory=list)
    blocks: dict[str, BlockSet] = field(default_factory=dict)
    encoder_blocks: dict[str, BlockSet] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    order: tuple[str, ...] = ()

    def components(self) -> list[Component]:
        """All components: dits, encoders, vaes, resident, others."""
        return [*self.dits, *self.encoders, *self.vaes, *self.resident, *self.others]

    def get(self, name: str) -> Component:
        for component in self.components():
            if component.name == name or name in component.aliases:
                return component
        raise KeyError(name)

    def by_role(self, role: Role | str) -> list[Component]:
        """The components of one role (``"dit"``, ``"encoder"``, ``"vae"``, ``"resident"``, ``"other"``)."""
        role = Role(role)
        return [c for c in self.components() if c.role is role]

    def blocks_of(self, name: str) -> BlockSet | None:
        """The blocks of the component called ``name``: a DiT's from :attr:`blocks`, an encoder's from
        :attr:`encoder_blocks`.

        An encoder absent from :attr:`encoder_blocks` gets the blocks :func:`find_encoder_blocks` finds, so a
        ``PipelineModules`` assembled without :func:`discover` (the built-in architectures') plans and runs
        like a discovered one; for a discovered pipeline that finds what discovery found.
        """
        if name in self.blocks:
            return self.blocks[name]
        if name in self.encoder_blocks:
            return self.encoder_blocks[name]
        component = next((c for c in self.encoders if c.name == name), None)
        return find_encoder_blocks(name, component.module) if component is not None else None
