"""Which tensors a module holds, as :class:`~vramferry.runtime.pieces.TensorRef` objects: each unique tensor once,
with every parameter and buffer slot that holds it (tied weights share one)."""

from __future__ import annotations

from torch import nn

from ..discovery.bnb import held_of
from ..discovery.leaves import layout_of
from ..discovery.sizes import tensor_key
from .pieces import TensorRef


def collect_refs(
    module: nn.Module, exclude: set[int], claimed: dict[tuple, TensorRef]
) -> tuple[list[TensorRef], list[TensorRef]]:
    """Tensors of ``module`` outside the excluded submodules (by id).

    Returns:
        ``(new, seen)``: tensors claimed now, and tensors already claimed by an earlier call (tied weights).
    """
    new: list[TensorRef] = []
    seen: list[TensorRef] = []
    for sub in _modules_outside(module, exclude):
        for name, param in list(sub._parameters.items()):
            if param is not None:
                _add_ref(new, seen, claimed, sub, name, param, is_param=True)
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                _add_ref(new, seen, claimed, sub, name, buf, is_param=False)
    return new, seen


def _modules_outside(root: nn.Module, exclude: set[int]):
    stack = [root]
    seen: set[int] = set()
    while stack:
        module = stack.pop()
        if id(module) in seen or (module is not root and id(module) in exclude):
            continue
        seen.add(id(module))
        yield module
        stack.extend(reversed(list(module._modules.values())))


def _add_ref(new, seen, claimed, module, name, tensor, *, is_param: bool) -> None:
    key = tensor_key(tensor)
    if key in claimed:
        ref = claimed[key]
        if not any(m is module and n == name for m, n in ref.owners):
            ref.owners.append((module, name))
        if is_param and ref.param is not None and not any(p is tensor for p in ref.params):
            ref.params.append(tensor)
        if ref not in new:
            seen.append(ref)
        return
    layout, nbytes = layout_of(held_of(tensor, module) if is_param else tensor)
    ref = TensorRef(
        param=tensor if is_param else None,
        owners=[(module, name)],
        shape=tensor.shape,
        dtype=tensor.dtype,
        nbytes=nbytes,
        original_device=tensor.device,
        layout=layout,
        params=[tensor] if is_param else [],
    )
    claimed[key] = ref
    new.append(ref)
