"""Byte sizes and dtypes of modules. Pure: works on meta tensors, reads no values, moves nothing."""

from __future__ import annotations

from torch import nn


def param_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, each tensor counted once (tied weights share one).

    Works on meta tensors (the size is computed from shape and dtype, nothing is read).
    """
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def dominant_dtype(module: nn.Module) -> str:
    """The dtype holding most of ``module``'s parameter bytes, as ``str(dtype)`` (``"torch.bfloat16"``).

    Buffers decide only when there are no parameters; ``"torch.float32"`` for a module without tensors.
    """
    for tensors in (module.parameters(), module.buffers()):
        by_dtype: dict[str, int] = {}
        seen: set[int] = set()
        for tensor in tensors:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
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
