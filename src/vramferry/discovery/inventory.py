"""The inventory: every component's weight bytes, its blocks' bytes and its shape, each tensor counted once by
:func:`~vramferry.discovery.sizes.tensor_key` (the rule the host store uses too).

Works on meta tensors: sizes come from shapes and dtypes, nothing is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from .shapes import DitShape, VaeShape, dit_shape_from_config, itemsize_of, token_split, vae_shape_from_config
from .sizes import _count

if TYPE_CHECKING:
    from .modules import PipelineModules


@dataclass(frozen=True)
class ComponentSize:
    """The weight bytes of one component (planner input).

    Attributes:
        name, role: as discovered.
        bytes: all parameter and buffer bytes of the component, blocks included.
        dtype: the dtype storing most of its bytes (``"torch.bfloat16"``; ``"torch.int8"`` for int8 weights).
        block_names, block_bytes: the repeated blocks of a DiT or an encoder in execution order, and their bytes.
        shape: what the cost model needs beyond bytes: a :class:`DitShape` for a DiT, a :class:`VaeShape` for a
            VAE; ``None`` when unknown (the planner then estimates from the bytes).
        formats: the quantized formats that hold some of its weights (``("Int8Tensor weight-only",)``, ``("Params4bit nf4",)``);
            empty for plain ones.
        compiled_blocks: its blocks were compiled (``block.compile()``, diffusers' ``compile_repeated_blocks``)
            when the inventory was taken: the cost model then expects faster block compute until it is measured.
    """

    name: str
    role: str
    bytes: int
    dtype: str = "torch.float32"
    block_names: tuple[str, ...] = ()
    block_bytes: tuple[int, ...] = ()
    shape: DitShape | VaeShape | None = None
    formats: tuple[str, ...] = ()
    compiled_blocks: bool = False

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


def _config_of(module: nn.Module) -> dict[str, Any]:
    config = getattr(module, "config", None)
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {}


def _shape_of(
    role: str, module: nn.Module, blocks: Sequence[nn.Module], block_bytes: Sequence[int], dtype: str
) -> DitShape | VaeShape | None:
    if role == "dit":
        shape = dit_shape_from_config(_config_of(module), block_bytes, itemsize_of(dtype))
        text, mod = token_split(blocks)
        return dataclasses.replace(shape, text_bytes=text, mod_bytes=mod) if blocks else shape
    return vae_shape_from_config(_config_of(module)) if role == "vae" else None


def inventory_of(modules: PipelineModules, order: Sequence[str] | None = None) -> Inventory:
    """Byte sizes of every discovered component and of the blocks of DiTs and encoders; works on meta tensors.

    Bytes are parameters plus buffers, each tensor counted once across the whole pipeline (in the first
    component, and the first block, that reaches it).

    Args:
        modules: what discovery found; :meth:`~vramferry.discovery.PipelineModules.blocks_of` gives each DiT's
            and encoder's blocks.
        order: component names in the order a request runs them; default: the order discovery found
            (:attr:`~vramferry.discovery.PipelineModules.order`), else encoders, DiTs, VAEs.

    Returns:
        An :class:`Inventory`.
    """
    seen: set = set()
    sizes = []
    for component in modules.components():
        by_dtype: dict[str, int] = {}
        formats: set[str] = set()
        blockset = modules.blocks_of(component.name)
        blocks = tuple(blockset.blocks) if blockset is not None else ()
        block_bytes = tuple(_count([block], seen, by_dtype, formats) for block in blocks)
        total = sum(block_bytes) + _count([component.module], seen, by_dtype, formats)
        dtype = max(by_dtype, key=by_dtype.get) if by_dtype else "torch.float32"
        role = str(getattr(component.role, "value", component.role))
        shape = _shape_of(role, component.module, blocks, block_bytes, dtype)
        names = tuple(blockset.names) if blockset is not None else ()
        compiled = bool(blocks) and all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
        sizes.append(
            ComponentSize(
                component.name, role, total, dtype, names, block_bytes, shape, tuple(sorted(formats)), compiled
            )
        )
    if order is None:
        order = modules.order or [
            c.name for role in ("encoder", "dit", "vae") for c in sizes if c.role == role
        ]
    known = {c.name for c in sizes}
    return Inventory(modules.pipeline_class, tuple(sizes), tuple(n for n in order if n in known))
