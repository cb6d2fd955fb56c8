"""Changes made to a component's tensors while a handle is live, found piece by piece.

peft's calls change what a component holds: ``add_adapter`` and ``load_lora_weights`` add tensors inside the
layers they wrap, ``delete_adapters`` and ``unload_lora_weights`` remove them, ``fuse_lora`` and ``unfuse_lora``
change the values of the base weights they fuse into (in place, or by assigning new data). The host store packed
the tensors as they were. Here the pieces (a component's non-block part, one of its blocks) whose tensors or
fused state changed are found, so that only those are packed again; the others keep their host bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..discovery.leaves import align, rebuild, view_in
from ..discovery.modules import PipelineModules
from ..errors import OffloadError
from .pieces import Piece, TensorRef


def merged_adapters(module: nn.Module) -> tuple:
    """Which adapters are fused into which layers (peft's ``merged_adapters``), by layer path."""
    return tuple(
        (path, tuple(merged))
        for path, sub in module.named_modules()
        if isinstance(merged := getattr(sub, "merged_adapters", None), list) and merged
    )


def signature(module: nn.Module) -> tuple:
    """What changes when ``module``'s tensors change: each parameter object and buffer name by its owner, and the
    fused adapters. No value is read: a fuse shows in the fused state, and binding weights to host or device
    copies (``param.data``, a buffer swapped in its owner) leaves the signature as it is."""
    tensors = []
    for sub in module.modules():
        tensors.extend((id(sub), name, id(p)) for name, p in sub._parameters.items() if p is not None)
        tensors.extend((id(sub), name) for name, b in sub._buffers.items() if b is not None)
    return tuple(tensors), merged_adapters(module)


def piece_key(piece: Piece) -> tuple:
    """The tensors of ``piece``: each parameter object and its holders, in packing order."""
    return tuple((id(ref.param), tuple((id(m), n) for m, n in ref.owners)) for ref in piece.refs)


@dataclass
class Changes:
    """What changed in a pipeline's components since their pieces were packed.

    Attributes:
        pieces: every component's pieces as they are now: the unchanged ones as they were packed, new ones for
            the changed.
        new: per changed component, the new pieces, to pack.
        dead: the packed pieces they replace.
        fused: ids of the dead pieces whose values a fuse or unfuse changed.
        signatures: the changed components' signatures now.
    """

    pieces: dict[str, list[Piece]]
    new: dict[str, list[Piece]] = field(default_factory=dict)
    dead: list[Piece] = field(default_factory=list)
    fused: set[int] = field(default_factory=set)
    signatures: dict[str, tuple] = field(default_factory=dict)

    @property
    def new_bytes(self) -> int:
        return sum(piece.layout() for pieces in self.new.values() for piece in pieces)


def find_changes(
    modules: PipelineModules,
    packed: dict[str, list[Piece]],
    shared: Piece | None,
    signatures: dict[str, tuple],
    collect: Callable[[PipelineModules], tuple[dict[str, list[Piece]], Piece]],
) -> Changes | None:
    """The pieces to pack again, or ``None`` when no component changed since ``signatures`` were taken.

    Args:
        collect: how the pieces were collected when they were packed
            (:func:`~vramferry.runtime.install.collect_pieces`); called only when something changed.

    Raises:
        OffloadError: the change reaches tensors shared by two pieces (tied weights), which stay where they are.
    """
    now = {c.name: signature(c.module) for c in modules.components()}
    changed = [name for name, sig in now.items() if sig != signatures[name]]
    if not changed:
        return None
    collected, now_shared = collect(modules)
    if piece_key(now_shared) != (piece_key(shared) if shared is not None else ()):
        raise OffloadError(
            f"{', '.join(changed)}: the change reaches tensors that several parts of the pipeline share (tied "
            "weights), which the offload keeps in place. Call handle.remove(), make the change, then apply again."
        )
    changes = Changes(pieces=dict(packed))
    for name in changed:
        component = modules.get(name).module
        fused = fused_modules(component, signatures[name][1], now[name][1])
        old_refs = {_ref_key(ref): ref for piece in packed[name] for ref in piece.refs}
        homes = {ref.original_device for ref in old_refs.values()}
        # A tensor added while the weights were bound to host or device copies goes back, at remove(), where the
        # component's weights were before apply.
        home = next(iter(homes)) if len(homes) == 1 else None
        pieces = []
        for old, new in zip(packed[name], collected[name], strict=True):
            touched = any(id(m) in fused for ref in old.refs for m, _n in ref.owners)
            if piece_key(old) == piece_key(new) and not touched:
                pieces.append(old)
                continue
            for ref in new.refs:
                kept = old_refs.get(_ref_key(ref))
                if kept is not None:
                    ref.original_device = kept.original_device
                elif home is not None:
                    ref.original_device = home
            pieces.append(new)
            changes.new.setdefault(name, []).append(new)
            changes.dead.append(old)
            if touched:
                changes.fused.add(id(old))
        changes.pieces[name] = pieces
        changes.signatures[name] = now[name]
    return changes


def fused_modules(module: nn.Module, before: tuple, now: tuple) -> set[int]:
    """Ids of the modules inside the layers whose fused adapters differ between two :func:`merged_adapters`."""
    old, new = dict(before), dict(now)
    found: set[int] = set()
    for path in old.keys() | new.keys():
        if old.get(path) == new.get(path):
            continue
        try:
            layer = module.get_submodule(path)
        except AttributeError:
            continue  # the layer is gone (unloaded): its piece's tensors changed as well
        found.update(id(m) for m in layer.modules())
    return found


def bind_decoded(piece: Piece) -> None:
    """Bind the tensors of an encoded ``piece`` that sit on their placeholders to its decoded bytes (a buffer of
    their own), so that what they hold can be read to pack them again."""
    scratch = torch.empty(piece.encoded.nbytes, dtype=torch.uint8)
    piece.encoded.decode_into(scratch)
    inner = 0
    for ref in piece.refs:
        if _bound_to(ref, ref.host):
            ref.bind(rebuild(ref.layout, view_in(scratch[inner : inner + ref.nbytes])))
        inner = align(inner + ref.nbytes)


def _bound_to(ref: TensorRef, tensor: torch.Tensor | None) -> bool:
    current = ref.current()
    return tensor is not None and current.data_ptr() == tensor.data_ptr() and current.shape == tensor.shape


def _ref_key(ref: TensorRef) -> tuple:
    return id(ref.param), tuple((id(m), n) for m, n in ref.owners)
