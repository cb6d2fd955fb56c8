"""The host store: canonical host copies of weights, packed per unit into contiguous arenas.

A *unit* is a set of tensors that move together (a whole component, the non-block part of a DiT, or one
block). Each unit's tensors are laid out back to back (aligned) in one host buffer, so that loading a unit is
a single large copy, and its device copy is one buffer whose views become the parameters.

Host buffers are allocated pageable and then page-locked in place with ``cudaHostRegister``: exact size, no
power-of-two rounding of the caching host allocator, and ~0.08 s/GB instead of ~0.7 s/GB for ``pin_memory()``.
"""

from __future__ import annotations

import logging
import mmap
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..discovery.leaves import Layout, align, layout_of, leaves, rebuild, view_in
from ..discovery.sizes import tensor_key
from ..units import format_bytes
from .fill import Filler

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class TensorRef:
    """One unique tensor (a parameter or a buffer) and every place that holds it.

    ``param`` is set for parameters (rebinding ``param.data`` keeps the Parameter object, so tied weights and
    references elsewhere stay valid), and ``params`` holds every Parameter object over the same weights
    (:func:`~vramferry.discovery.sizes.tensor_key`); buffers are rebound in each owner's ``_buffers``.
    """

    param: nn.Parameter | None
    owners: list[tuple[nn.Module, str]]
    shape: torch.Size
    dtype: torch.dtype
    nbytes: int  # its leaves' bytes, each aligned (:func:`~vramferry.discovery.leaves.layout_of`)
    original_device: torch.device
    layout: Layout | None = None  # how its leaves lie in its byte range (one leaf for a plain tensor)
    offset: int = 0  # within the unit
    host: torch.Tensor | None = None  # view into the unit's host buffer
    params: list[nn.Parameter] = field(default_factory=list)

    def bind(self, tensor: torch.Tensor) -> None:
        """Point every holder at ``tensor`` (a pointer swap; no bytes move)."""
        for param in self.params:
            param.data = tensor
        for module, name in self.owners:
            if name in module._buffers:
                module._buffers[name] = tensor

    def current(self) -> torch.Tensor:
        if self.param is not None:
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
    # pieces merged. One copy per run; a unit packed in one piece has one run.
    runs: list[tuple[torch.Tensor, int]] = field(default_factory=list)
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
        runs: list[tuple[torch.Tensor, int]] = []
        offset = 0
        for piece in pieces:
            host = piece.host
            if runs and _adjacent(runs[-1][0], host) and runs[-1][1] + runs[-1][0].numel() == offset:
                first, start = runs[-1]
                runs[-1] = (_joined(first, host), start)
            else:
                runs.append((host, offset))
            offset += host.numel()
        self.runs = runs

    def copy_into(self, buffer: torch.Tensor, begin: int = 0, end: int | None = None, **kw) -> None:
        """Copy the bytes ``[begin, end)`` of the unit's layout from the host arenas into ``buffer``."""
        end = self.nbytes if end is None else end
        for host, start in self.runs:
            lo, hi = max(begin, start), min(end, start + host.numel())
            if lo < hi:
                buffer[lo:hi].copy_(host[lo - start : hi - start], **kw)

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
    host: torch.Tensor | None = None  # uint8, the piece's slice of its arena
    nbytes: int = 0

    def layout(self) -> int:
        offset = 0
        for ref in self.refs:
            offset = align(offset + ref.nbytes)
        self.nbytes = offset
        return offset


def _own_copy(ref: TensorRef, home: torch.device) -> torch.Tensor:
    """``ref``'s tensor with storage of its own on ``home``, rebuilt leaf by leaf from its host copy."""
    copies = {
        id(leaf): tensor.to(home) if home.type != "cpu" else tensor.clone()
        for tensor, leaf in leaves(ref.host, ref.layout)
    }
    return rebuild(ref.layout, lambda leaf: copies[id(leaf)])


def _adjacent(first: torch.Tensor, second: torch.Tensor) -> bool:
    """``second`` starts where ``first`` ends, in the same arena."""
    return (
        first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
        and first.storage_offset() + first.numel() == second.storage_offset()
    )


def _joined(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The slice of their arena spanning two adjacent slices."""
    return first.as_strided((first.numel() + second.numel(),), (1,), first.storage_offset())


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
    layout, nbytes = layout_of(tensor)
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


def host_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-aligned host memory, backed by transparent huge pages where the kernel offers them.

    Huge pages mean 512x fewer page-table (and IOMMU) entries for the copy engine to walk when it streams tens
    of GB; where ``madvise`` is unsupported, ordinary pages are used.
    """
    try:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, AttributeError):
        return torch.empty(nbytes, dtype=torch.uint8)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer keeps a reference to the region; no copy is made
        return torch.frombuffer(region, dtype=torch.uint8)


class HostStore:
    """Owns the host arenas: one contiguous buffer per component, its pieces packed in order.

    Args:
        pin: page-lock the arenas (needs CUDA).
        pin_limit: most bytes to page-lock; arenas beyond it stay pageable (slower copies, one warning).
    """

    def __init__(self, *, pin: bool, pin_limit: int | None = None) -> None:
        self.pin = pin and torch.cuda.is_available()
        self.pin_limit = pin_limit
        self.pinned_bytes = 0
        self.pageable_bytes = 0
        self._arenas: list[tuple[torch.Tensor, bool, list[Piece]]] = []
        self._warned = False

    def pack(self, name: str, pieces: list[Piece], filler: Filler | None = None) -> None:
        """Pack ``pieces`` into one new arena, each contiguous and in order, and make the arena copies canonical
        (parameters rebound to them). Done once per handle: plans place pieces, they never repack them.

        ``filler`` fills the arena (from the checkpoint files where tensors are mapped views of them); a
        default one is made when it is not given."""
        total = sum(piece.layout() for piece in pieces)
        if total == 0:
            return
        arena = host_buffer(total)
        pinned = self._register(arena, name)
        offset = 0
        for piece in pieces:
            piece.host = arena[offset : offset + piece.nbytes]
            offset += piece.nbytes
        if filler is not None:
            filler.fill(pieces)
        else:
            filler = Filler()
            try:
                filler.fill(pieces)
            finally:
                filler.close()
        self._arenas.append((arena, pinned, pieces))
        if pinned:
            self.pinned_bytes += total
        else:
            self.pageable_bytes += total

    def _register(self, arena: torch.Tensor, name: str) -> bool:
        if not self.pin:
            return False
        size = arena.numel()
        if self.pin_limit is not None and self.pinned_bytes + size > self.pin_limit:
            self._warn_pageable(
                name, f"the host page-lock limit of {format_bytes(self.pin_limit)} is reached"
            )
            return False
        err = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), size, 0)
        if int(err) != 0:
            self._warn_pageable(name, f"cudaHostRegister failed ({err})")
            return False
        return True

    def _warn_pageable(self, name: str, why: str) -> None:
        if not self._warned:
            logger.warning(
                "%s: keeping host copies in pageable memory because %s; copies to the GPU will run about 7x "
                "slower (pageable ~8 GB/s vs pinned ~55 GB/s on PCIe Gen5) and block the host. "
                "Raise host_memory_limit or free host memory to avoid this.",
                name,
                why,
            )
            self._warned = True

    def restore(self) -> None:
        """Give every tensor back its own storage on its original device and free the arenas one by one.

        Host memory peaks at the weights plus one arena, not twice the weights.
        """
        while self._arenas:
            arena, pinned, pieces = self._arenas.pop(0)
            for piece in pieces:
                for ref in piece.refs:
                    home = ref.original_device
                    # clone(): a tensor of its own, so nothing shares storage after remove (safetensors
                    # refuses to save tensors that share memory).
                    ref.bind(_own_copy(ref, home))
                    ref.host = None
                piece.host = None
            if pinned:
                torch.cuda.cudart().cudaHostUnregister(arena.data_ptr())
            del arena
