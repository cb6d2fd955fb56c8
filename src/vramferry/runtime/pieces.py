"""What the host store packs and the runtime moves: tensor references (:class:`TensorRef`: each tensor once,
with every slot that holds it), pieces (:class:`Piece`: what a plan places as one, its bytes in an arena of the
host store) and units (:class:`Unit`: the pieces that move to the device together, as runs of host bytes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..discovery.bnb import bind_state, held_of
from ..discovery.leaves import Held, Layout, Leaf, Stateful, Wrapped, align, leaves, rebuild, view_in
from .codecs import Encoded


@dataclass(eq=False)
class TensorRef:
    """One unique tensor (a parameter or a buffer) and every place that holds it.

    ``param`` is set for parameters (rebinding ``param.data`` keeps the Parameter object, so tied weights and
    references elsewhere stay valid), and ``params`` holds every Parameter object over the same weights
    (:func:`~vramferry.discovery.sizes.tensor_key`); buffers are rebound in each owner's ``_buffers``. A
    bitsandbytes parameter is bound as a :class:`~vramferry.discovery.leaves.Held`: its data, and its
    quantization state in the objects that hold it (:func:`~vramferry.discovery.bnb.bind_state`).
    """

    param: nn.Parameter | None
    owners: list[tuple[nn.Module, str]]
    shape: torch.Size
    dtype: torch.dtype
    nbytes: int  # its leaves' bytes, each aligned (:func:`~vramferry.discovery.leaves.layout_of`)
    original_device: torch.device
    layout: Layout | None = None  # how its leaves lie in its byte range (one leaf for a plain tensor)
    offset: int = 0  # within the unit
    host: torch.Tensor | Held | None = None  # view into the unit's host buffer
    params: list[nn.Parameter] = field(default_factory=list)

    def bind(self, tensor: torch.Tensor | Held) -> None:
        """Point every holder at ``tensor`` (a pointer swap; no bytes move)."""
        if torch.is_inference_mode_enabled():
            # ``param.data = ...`` of a tensor subclass (torchao's) fails inside inference mode, and a parameter
            # rebound there could never take requires_grad again.
            with torch.inference_mode(False):
                self.bind(tensor)
            return
        if isinstance(tensor, Held):
            modules = [module for module, _name in self.owners]
            for param in self.params:
                param.data = tensor.data  # first: Int8Params' CB follows the data
                bind_state(param, modules, tensor.state)
            return
        inner = [name for name, _child in self.layout.inner] if isinstance(self.layout, Wrapped) else ()
        for param in self.params:
            param.data = tensor
            # A wrapper subclass parameter (torchao's) keeps its inner tensors as attributes of the Python
            # object, which ``.data`` does not replace: its kernels would read the old ones.
            for name in inner:
                setattr(param, name, getattr(tensor, name))
        for module, name in self.owners:
            if name in module._buffers:
                module._buffers[name] = tensor

    def current(self) -> torch.Tensor | Held:
        if self.param is not None:
            if isinstance(self.layout, Stateful):
                return held_of(self.param, self.owners[0][0])
            return self.param.data
        module, name = self.owners[0]
        return module._buffers[name]


@dataclass(eq=False)
class Unit:
    """Tensors that are loaded and dropped together."""

    name: str
    refs: list[TensorRef]
    nbytes: int = 0  # aligned size of the unit's device copy
    # (host bytes, offset in the device copy): the unit's pieces as they lie in the host arenas, consecutive
    # pieces merged. One copy per run; a unit packed in one piece has one run. An encoded piece is a run of its
    # own, its :class:`~vramferry.runtime.codecs.Encoded` in place of host bytes (decoded on the way in).
    runs: list[tuple[torch.Tensor | Encoded, int]] = field(default_factory=list)
    device_buffer: torch.Tensor | None = None
    ready_event: object | None = None  # torch.cuda.Event once a copy was issued
    on_device: bool = False
    slot: object | None = None  # layerwise slot holding it
    extra: dict = field(default_factory=dict)
    # Staged loading (a swapped DiT's blocks): the bytes before the first block, then per stage its end offset
    # and the blocks it holds. Kernels outside the blocks wait for the head; each block waits for its stage.
    head_bytes: int = 0
    stages: list[tuple[int, tuple[nn.Module, ...]]] = field(default_factory=list)
    head_event: object | None = None  # pending: the head landed
    stage_events: dict[int, object] = field(default_factory=dict)  # pending: block id -> its stage landed

    def __post_init__(self) -> None:
        self.layout()

    def layout(self) -> None:
        offset = 0
        for ref in self.refs:
            ref.offset = offset
            offset = align(offset + ref.nbytes)
        self.nbytes = offset

    def set_runs(self, pieces: list[Piece]) -> None:
        """Lay the unit out as ``pieces`` back to back (their refs in order) and note where each piece's host
        bytes go in the device copy, merging pieces that are adjacent in the same arena."""
        self.refs = [ref for piece in pieces for ref in piece.refs]
        self.layout()
        runs: list[tuple[torch.Tensor | Encoded, int]] = []
        offset = 0
        for piece in pieces:
            if piece.encoded is not None:
                runs.append((piece.encoded, offset))
                offset += piece.encoded.nbytes
                continue
            if piece.mapped:
                # One run per leaf, from its file view to its aligned place in the device copy.
                for ref in piece.refs:
                    for tensor, leaf in leaves(ref.host, ref.layout):
                        runs.append((tensor.detach().reshape(-1).view(torch.uint8), ref.offset + leaf.offset))
                offset += piece.layout()
                continue
            host = piece.host
            last = runs[-1][0] if runs else None
            if isinstance(last, torch.Tensor) and _adjacent(last, host) and runs[-1][1] + last.numel() == offset:
                first, start = runs[-1]
                runs[-1] = (_joined(first, host), start)
            else:
                runs.append((host, offset))
            offset += host.numel()
        self.runs = runs

    def copy_into(self, buffer: torch.Tensor, begin: int = 0, end: int | None = None, *, base: int = 0, **kw) -> None:
        """Copy the bytes ``[begin, end)`` of the unit's layout from the host arenas into ``buffer``, whose byte 0
        is the layout's byte ``base`` (a staging buffer for a slice of it)."""
        end = self.nbytes if end is None else end
        for host, start in self.runs:
            size = host.nbytes if isinstance(host, Encoded) else host.numel()
            lo, hi = max(begin, start), min(end, start + size)
            if lo >= hi:
                continue
            if isinstance(host, Encoded):
                decode_range(host, buffer[lo - base : hi - base], lo - start)
            else:
                buffer[lo - base : hi - base].copy_(host[lo - start : hi - start], **kw)

    @property
    def encoded(self) -> bool:
        """Some of its pieces are kept encoded in the host store."""
        return any(isinstance(host, Encoded) for host, _start in self.runs)

    @property
    def host_bytes(self) -> int:
        """The bytes a load moves over the link: encoded pieces count their compressed size."""
        return sum(h.payload.numel() if isinstance(h, Encoded) else h.numel() for h, _s in self.runs)

    def view(self, buffer: torch.Tensor, ref: TensorRef) -> torch.Tensor:
        """``ref``'s tensor (a tensor subclass rebuilt around its leaves) viewing a packed uint8 buffer laid out
        like this unit."""
        return rebuild(ref.layout, view_in(buffer[ref.offset : ref.offset + ref.nbytes]))

    def set_stages(self, blocks: list[tuple[nn.Module, list[TensorRef]]], min_bytes: int) -> None:
        """Split the copy of this unit at block boundaries (``blocks``: each block with its refs, laid out in
        this order after the head), merging consecutive blocks until a stage holds ``min_bytes``."""
        firsts = [(block, refs[0].offset) for block, refs in blocks if refs]
        if not firsts:
            return
        self.head_bytes = firsts[0][1]
        starts = [offset for _block, offset in firsts[1:]] + [self.nbytes]
        stages: list[tuple[int, tuple[nn.Module, ...]]] = []
        group: list[nn.Module] = []
        begin = self.head_bytes
        for (block, _offset), end in zip(firsts, starts, strict=True):
            group.append(block)
            if end - begin >= min_bytes or end == self.nbytes:
                stages.append((end, tuple(group)))
                group, begin = [], end
        self.stages = stages

    def bind_host(self) -> None:
        for ref in self.refs:
            ref.bind(ref.host)
        self.on_device = False

    def bind_buffer(self, buffer: torch.Tensor) -> None:
        # Outside inference mode, whatever the caller runs in: views made inside it would be inference tensors,
        # and a parameter bound to one can never take requires_grad again (an adapter's set_adapters does).
        with torch.inference_mode(False):
            for ref in self.refs:
                ref.bind(self.view(buffer, ref))


@dataclass(eq=False)
class Piece:
    """What the host store packs contiguously and a plan places as one: a component's non-block part, or one of
    its blocks (``block`` set). Its host bytes never move, whatever the plan: units are made of pieces."""

    name: str
    component: str
    refs: list[TensorRef]
    block: nn.Module | None = None
    host: torch.Tensor | None = None  # uint8, the piece's slice of its arena (None when encoded)
    nbytes: int = 0
    encoded: Encoded | None = None  # its compressed bytes, when a codec keeps it
    mapped: bool = False  # its tensors are views of their checkpoint files: no host copy of its own

    @property
    def encodable(self) -> bool:
        """Made of plain parameters only. A tensor subclass or a bitsandbytes parameter keeps its raw leaves; a
        piece with buffers stays raw too, since pipeline code may read a buffer on the host between loads (a
        placeholder would read zeros)."""
        return bool(self.refs) and all(isinstance(ref.layout, Leaf) and ref.param is not None for ref in self.refs)

    def layout(self) -> int:
        offset = 0
        for ref in self.refs:
            offset = align(offset + ref.nbytes)
        self.nbytes = offset
        return offset


def decode_range(encoded: Encoded, out: torch.Tensor, skip: int = 0) -> None:
    """Decode ``encoded`` and write its bytes ``[skip, skip + len(out))`` into ``out`` (synchronously)."""
    if skip == 0 and out.numel() == encoded.nbytes and out.device.type == "cpu":
        encoded.decode_into(out)
        return
    whole = torch.empty(encoded.nbytes, dtype=torch.uint8)
    encoded.decode_into(whole)
    out.copy_(whole[skip : skip + out.numel()])


def placeholder(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor of ``shape`` and ``dtype`` that holds one element, expanded: what an encoded piece's tensors
    are bound to while they are not loaded (the right metadata, no weights, no memory)."""
    return torch.zeros((), dtype=dtype).expand(shape)


def _adjacent(first: torch.Tensor, second: torch.Tensor) -> bool:
    """``second`` starts where ``first`` ends, in the same arena."""
    return (
        first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
        and first.storage_offset() + first.numel() == second.storage_offset()
    )


def _joined(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The slice of their arena spanning two adjacent slices."""
    return first.as_strided((first.numel() + second.numel(),), (1,), first.storage_offset())
