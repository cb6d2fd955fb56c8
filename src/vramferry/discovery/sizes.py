"""Byte sizes of modules, and the one rule that says when two tensors are the same weights (:func:`tensor_key`),
used by the inventory and by the host store alike. Works on meta tensors: sizes come from shapes and dtypes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from .bnb import format_of, held_of, kind_of
from .leaves import format_name, storage_bytes


def tensor_key(tensor: torch.Tensor) -> tuple:
    """The identity of a weight: two names with the same key hold the same weights and are stored once.

    A plain tensor with real storage is identified by its storage view (pointer, offset, shape, strides,
    dtype), so two Parameter objects over the same memory count once; a meta tensor, an empty one, or a tensor
    subclass (whose storage belongs to its inner tensors) by the object itself.
    """
    if type(tensor) in (torch.Tensor, nn.Parameter) and tensor.device.type != "meta" and tensor.numel():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr:
            return ("view", ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
    return ("object", id(tensor))


def _count(
    modules: Iterable[nn.Module], seen: set, by_dtype: dict[str, int], formats: set | None = None
) -> int:
    """Parameter and buffer bytes of ``modules`` not in ``seen`` (which is updated); ``by_dtype`` gathers them by
    the dtype that stores them, ``formats`` the quantized formats met (:func:`~vramferry.discovery.leaves.format_name`,
    :func:`~vramferry.discovery.bnb.format_of`)."""
    total = 0
    for module in modules:
        for owner in module.modules():
            for tensor in itertools.chain(owner._parameters.values(), owner._buffers.values()):
                if tensor is None or (key := tensor_key(tensor)) in seen:
                    continue
                seen.add(key)
                # A quantized tensor's real bytes (data and scales, bitsandbytes' quantization state too), by
                # the dtypes that store them.
                for dtype, nbytes in storage_bytes(held_of(tensor, owner)).items():
                    total += nbytes
                    by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
                if formats is not None and (name := _format(tensor)) is not None:
                    formats.add(name)
    return total


def _format(tensor: torch.Tensor) -> str | None:
    return format_of(tensor) if kind_of(tensor) is not None else format_name(tensor)


def param_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, each tensor counted once (tied weights share one).

    Works on meta tensors (the size is computed from shape and dtype, nothing is read).
    """
    seen: set = set()
    return _count([module], seen, {})


def dominant_dtype(module: nn.Module) -> str:
    """The dtype holding most of ``module``'s parameter bytes, as ``str(dtype)`` (``"torch.bfloat16"``).

    Buffers decide only when there are no parameters; ``"torch.float32"`` for a module without tensors.
    """
    for tensors in (module.parameters(), module.buffers()):
        by_dtype: dict[str, int] = {}
        seen: set = set()
        for tensor in tensors:
            if tensor_key(tensor) in seen:
                continue
            seen.add(tensor_key(tensor))
            key = str(tensor.dtype)
            by_dtype[key] = by_dtype.get(key, 0) + tensor.numel() * tensor.element_size()
        if by_dtype:
            # max() keeps the first of equal sizes, so a tie goes to the dtype met first.
            return max(by_dtype, key=lambda k: by_dtype[k])
    return "torch.float32"


def has_tensors(module: nn.Module) -> bool:
    """Whether ``module`` or a descendant holds a parameter or a buffer."""
    return next(module.parameters(), None) is not None or next(module.buffers(), None) is not None


def own_tensor_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers registered on ``module`` itself, not on its children."""
    tensors = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)
