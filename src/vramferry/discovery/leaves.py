"""Any tensor as host bytes and back: a plain tensor is one leaf; a tensor subclass (torchao's quantized tensors,
diffusers' ``GGUFParameter`` and the like) is its ``__tensor_flatten__`` leaves plus the metadata that
``__tensor_unflatten__`` needs to rebuild it; a bitsandbytes parameter is a :class:`Held`, its data and the
quantization state its layer reads (:mod:`~vramferry.discovery.bnb`), one leaf each.

A tensor's leaves are laid out back to back, each aligned, in a byte range of its unit; :func:`rebuild` makes the
tensor again from such a range (on the host or on the device), the subclass, its metadata and its outer size and
strides included. Nothing here allocates: the store owns the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

ALIGN = 512  # bytes; keeps every view aligned for vectorised kernels and any dtype's element size


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Leaf:
    """A plain tensor's bytes: where they start in the tensor's range, its shape and dtype."""

    offset: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


@dataclass(frozen=True)
class Wrapped:
    """A tensor subclass: its class, its flatten metadata, its outer size and strides, and its inner tensors."""

    cls: type
    context: object
    size: torch.Size
    stride: tuple[int, ...]
    inner: tuple[tuple[str, Leaf | Wrapped], ...]


@dataclass(frozen=True)
class Stateful:
    """A parameter whose layer reads tensors kept beside it: its data, then each state tensor by name."""

    data: Leaf
    state: tuple[tuple[str, Leaf], ...]


Layout = Leaf | Wrapped | Stateful


class Held(NamedTuple):
    """A bitsandbytes parameter's tensors: its data and the state tensors its layer reads, by name
    (:func:`~vramferry.discovery.bnb.state_tensors`). What a :class:`Stateful` layout is read from and rebuilt
    as; :class:`~vramferry.runtime.pieces.TensorRef` binds both parts."""

    data: torch.Tensor
    state: dict[str, torch.Tensor]


def layout_of(tensor: torch.Tensor | Held, offset: int = 0) -> tuple[Layout, int]:
    """The layout of ``tensor``'s leaves starting at ``offset``, and the aligned end of its range."""
    if isinstance(tensor, Held):
        data, offset = layout_of(tensor.data, offset)
        state = []
        for name, part in tensor.state.items():
            leaf, offset = layout_of(part, offset)
            state.append((name, leaf))
        return Stateful(data, tuple(state)), offset
    if not is_traceable_wrapper_subclass(tensor):
        leaf = Leaf(offset, tensor.shape, tensor.dtype)
        return leaf, align(offset + leaf.nbytes)
    names, context = tensor.__tensor_flatten__()
    inner = []
    for name in names:
        child, offset = layout_of(getattr(tensor, name), offset)
        inner.append((name, child))
    return Wrapped(type(tensor), context, tensor.size(), tuple(tensor.stride()), tuple(inner)), offset


def rebuild(layout: Layout, view: Callable[[Leaf], torch.Tensor]) -> torch.Tensor | Held:
    """The tensor of ``layout`` with each leaf given by ``view`` (a view into bytes, or a copy)."""
    if isinstance(layout, Leaf):
        return view(layout)
    if isinstance(layout, Stateful):
        return Held(view(layout.data), {name: view(leaf) for name, leaf in layout.state})
    inner = {name: rebuild(child, view) for name, child in layout.inner}
    return layout.cls.__tensor_unflatten__(inner, layout.context, layout.size, layout.stride)


def leaves(tensor: torch.Tensor | Held, layout: Layout) -> Iterator[tuple[torch.Tensor, Leaf]]:
    """``tensor``'s plain leaves, each with its place in ``layout``."""
    if isinstance(layout, Leaf):
        yield tensor, layout
        return
    if isinstance(layout, Stateful):
        yield tensor.data, layout.data
        for name, leaf in layout.state:
            yield tensor.state[name], leaf
        return
    for name, child in layout.inner:
        yield from leaves(getattr(tensor, name), child)


def view_in(raw: torch.Tensor) -> Callable[[Leaf], torch.Tensor]:
    """Typed views of leaves inside ``raw``, a uint8 range laid out by :func:`layout_of`."""

    def view(leaf: Leaf) -> torch.Tensor:
        return raw[leaf.offset : leaf.offset + leaf.nbytes].view(leaf.dtype).view(leaf.shape)

    return view


def tensor_bytes(tensor: torch.Tensor | Held) -> int:
    """The bytes that hold ``tensor``'s data: a subclass's inner tensors (int8 data and scales, say), not its
    outer dtype times its elements; a :class:`Held`'s data and state."""
    if isinstance(tensor, Held):
        return sum(tensor_bytes(part) for part in (tensor.data, *tensor.state.values()))
    if not is_traceable_wrapper_subclass(tensor):
        return tensor.numel() * tensor.element_size()
    names, _context = tensor.__tensor_flatten__()
    return sum(tensor_bytes(getattr(tensor, name)) for name in names)


def storage_bytes(tensor: torch.Tensor | Held) -> dict[str, int]:
    """The bytes of ``tensor`` by the dtype that stores them (``{"torch.int8": ..., "torch.float32": ...}`` for
    an int8 weight with float32 scales); a plain tensor's are all of its own dtype."""
    if isinstance(tensor, Held):
        parts = [tensor.data, *tensor.state.values()]
    elif is_traceable_wrapper_subclass(tensor):
        parts = [getattr(tensor, name) for name in tensor.__tensor_flatten__()[0]]
    else:
        return {str(tensor.dtype): tensor.numel() * tensor.element_size()}
    found: dict[str, int] = {}
    for part in parts:
        for dtype, nbytes in storage_bytes(part).items():
            found[dtype] = found.get(dtype, 0) + nbytes
    return found


def format_name(tensor: torch.Tensor) -> str | None:
    """The format that holds ``tensor``'s data: its tensor subclass (``"Int8Tensor"``; ``"Float8Tensor weight-only"``
    for torchao's weight-only configs, whose activations stay unquantized), a quantized parameter
    with its block type (diffusers' GGUF weights: ``"GGUFParameter Q8_0"``), or ``None`` for a plain tensor."""
    if is_traceable_wrapper_subclass(tensor):
        # torchao's weight-only configs leave the activations unquantized: the weight is dequantized per matmul.
        only = hasattr(tensor, "act_quant_kwargs") and tensor.act_quant_kwargs is None
        return type(tensor).__name__ + (" weight-only" if only else "")
    # diffusers' GGUFParameter: raw GGML blocks as uint8, dequantized in the layer's forward.
    quant = getattr(tensor, "quant_type", None)
    if quant is not None:
        return f"{type(tensor).__name__} {getattr(quant, 'name', quant)}"
    return None
