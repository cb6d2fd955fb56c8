"""The host store: canonical host copies of weights, packed per unit into contiguous arenas.

A *unit* is a set of tensors that move together (a whole component, the non-block part of a DiT, or one
block). Each unit's tensors are laid out back to back (aligned) in one host buffer, so that loading a unit is
a single large copy, and its device copy is one buffer whose views become the parameters.

Host buffers are page-locked in place (:mod:`~vramferry.runtime.arenas`).

A piece may instead stay *mapped*: its tensors keep the views of their checkpoint files that diffusers made
(memory-mapped safetensors), and the host store holds no copy of it. Its bytes live in the page cache, shared
with every process that maps the same files and given back to the kernel under memory pressure (read from the
disk again when next needed); copies to the device go through pageable memory, about 7x slower than from the
arenas. The planner keeps the pieces that move least often this way when ``host_memory_limit`` is below the
weights.

A piece may be kept *encoded* by a lossless codec (:mod:`~vramferry.runtime.codecs`): the host then holds only
its compressed bytes, each such piece in a page-locked buffer of its own, and its tensors are bound between
loads to placeholders of the right shape and dtype that hold no weights (nothing may read them; ``verify``
names any module that tries).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..discovery.bnb import bind_state, held_of
from ..discovery.leaves import Held, Layout, Leaf, Stateful, Wrapped, align, leaves, rebuild, view_in
from ..units import format_bytes
from .arenas import PageLocker, arena_chunks, host_buffer
from .codecs import Codec, Encoded, encode_piece
from .files import FileMap
from .fill import Filler
from .shared import SharedArena, arena_name, open_arena

logger = logging.getLogger(__name__)


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


class HostStore:
    """Owns the host arenas: one contiguous buffer per component, its pieces packed in order.

    Args:
        pin: page-lock the arenas (needs CUDA).
        pin_limit: most bytes to page-lock; arenas beyond it stay pageable (slower copies, one warning).
        codec: the lossless codec that keeps the pieces :meth:`pack` is asked to encode; ``None``: all raw.
        portable: page-lock for every GPU (helper GPUs copy from the store too).
        share_dir: keep arenas whose bytes come from checkpoint files in this shared-memory folder, shared with
            the other processes that pack the same pieces (:mod:`~vramferry.runtime.shared`); ``None``: private.
    """

    def __init__(
        self,
        *,
        pin: bool,
        pin_limit: int | None = None,
        codec: Codec | None = None,
        portable: bool = False,
        share_dir: str | None = None,
    ) -> None:
        self.locker = PageLocker(pin=pin, pin_limit=pin_limit, portable=portable)
        self.share_dir = share_dir
        self.shared_bytes = 0  # arenas in shared memory (:mod:`~vramferry.runtime.shared`)
        self.shared_found_bytes = 0  # of which another process had filled
        self._shared: dict[int, SharedArena] = {}
        self.codec = codec
        self.pageable_bytes = 0
        self.encoded_bytes = 0  # compressed bytes held for encoded pieces
        self.encoded_raw_bytes = 0  # what those pieces decode to
        self.cached_pieces = 0  # encoded pieces whose bytes came from the compressed cache
        self.mapped_bytes = 0  # pieces left as views of their checkpoint files
        self.unmappable_bytes = 0  # pieces asked to stay mapped that are not clean file views (packed instead)
        self._mapped: list[Piece] = []
        self.encoded_pieces = 0  # encoded pieces compressed here
        self._arenas: list[tuple[torch.Tensor, bool, list[Piece]]] = []

    @property
    def pinned_bytes(self) -> int:
        return self.locker.pinned_bytes

    def pack(
        self,
        name: str,
        pieces: list[Piece],
        encode: set[int] | None = None,
        filler: Filler | None = None,
        cached: dict[int, Encoded] | None = None,
        mapped: set[int] | None = None,
        held: Callable[[list[Piece]], None] | None = None,
    ) -> None:
        """Pack ``pieces`` into new arenas (:func:`~vramferry.runtime.arenas.arena_chunks`), each piece contiguous
        and in order, and make the arena copies canonical (parameters rebound to them). Done once per handle: plans
        place pieces, they never repack them.

        Args:
            encode: ids of pieces to keep encoded by the store's codec instead (plain tensors only); each gets a
                buffer of its own holding only its compressed bytes.
            filler: fills the arena (from the checkpoint files where tensors are mapped views of them); a
                default one is made when it is not given.
            cached: pieces of ``encode`` whose encoded bytes are ready (read from the compressed cache), by id:
                kept as they are, their raw bytes never read.
            mapped: ids of raw pieces to leave as views of their checkpoint files where they are clean ones
                (no copy in the host store); the others are packed.
            held: called with the raw pieces once their arena is page-locked (on the page-locking thread while
                ``locker.in_background()`` lasts; never for an arena left pageable): they can be copied to the
                device from then on.
        """
        encode = encode if self.codec is not None and encode else set()
        coded = [p for p in pieces if id(p) in encode and p.encodable]
        raw = [p for p in pieces if not (id(p) in encode and p.encodable)]
        own = filler is None
        filler = filler if filler is not None else Filler()
        try:
            if mapped:
                raw = [p for p in raw if not (id(p) in mapped and self._keep_mapped(p, filler.files))]
            if coded:
                self._pack_encoded(name, coded, filler, cached or {})
            for chunk in arena_chunks(raw):
                self._pack_raw(name, chunk, filler, held)
            if own:
                filler.drain()  # a given filler's owner drains it: the next component's reads follow on
        finally:
            if own:
                filler.close()

    def _keep_mapped(self, piece: Piece, files: FileMap) -> bool:
        """Leave ``piece``'s tensors as the views of their checkpoint files they are, when every leaf of every
        tensor is a clean file region (:meth:`~vramferry.runtime.files.FileMap.region`); ``False`` otherwise (it
        is then packed into an arena)."""
        views = [(ref, ref.current()) for ref in piece.refs]
        for ref, tensor in views:
            for leaf_tensor, leaf in leaves(tensor, ref.layout):
                region = files.region(leaf_tensor)
                if region is None or region.nbytes != leaf.nbytes:
                    self.unmappable_bytes += piece.layout()
                    return False
        for ref, tensor in views:
            ref.host = tensor
        piece.mapped = True
        self.mapped_bytes += piece.layout()
        self._mapped.append(piece)
        return True

    def _pack_raw(self, name: str, raw: list[Piece], filler: Filler, held: Callable | None) -> None:
        total = sum(piece.layout() for piece in raw)
        if total == 0:
            return
        shared = self._open_shared(raw, filler.files, total) if self.share_dir is not None else None
        arena = shared.tensor if shared is not None else host_buffer(total)
        self._lay_out(raw, arena, views=False)
        if shared is None:
            # Page-locked once filled (the fill's threads fault the fresh pages in: the kernel zeroes each on its
            # first touch, where registering first would fault them all in on one thread), while the next arena's
            # first reads run.
            filler.fill(raw, then=lambda: self._hold(name, arena, raw, held=held))
            return
        if not shared.complete:
            filler.fill(raw)
        elif filler.progress is not None:
            filler.progress(total)  # another process read them
        if not shared.complete:
            shared.finish()
        # Two mappings of the same pages: the tensors view a private one (a write stays this process's), the
        # copies to the device read a shared read-only one (page-locked without copying a page).
        self._lay_out(raw, shared.private(), views=True)
        for piece in raw:
            for ref in piece.refs:
                ref.bind(ref.host)
        arena = shared.for_copies()
        self._lay_out(raw, arena, views=False)
        self._shared[id(arena)] = shared
        self._hold(name, arena, raw, read_only=True, held=held)

    def _open_shared(self, raw: list[Piece], files: FileMap, total: int) -> SharedArena | None:
        name = arena_name(raw, files)
        shared = open_arena(self.share_dir, name, total) if name is not None else None
        if shared is None and name is not None:
            self.share_dir = None  # the folder cannot hold it (said once): the other arenas stay private too
        if shared is not None:
            self.shared_bytes += total
            self.shared_found_bytes += total if shared.complete else 0
        return shared

    @staticmethod
    def _lay_out(pieces: list[Piece], arena: torch.Tensor, *, views: bool) -> None:
        """Give each piece its slice of ``arena``, back to back; ``views``: and each tensor its host view."""
        offset = 0
        for piece in pieces:
            piece.host = arena[offset : offset + piece.nbytes]
            offset += piece.nbytes
            if views:
                _view_refs(piece)

    def _hold(self, name: str, arena: torch.Tensor, pieces: list[Piece], *, read_only: bool = False,
              held: Callable[[list[Piece]], None] | None = None) -> None:
        """Keep ``arena`` (holding ``pieces``), page-locked where it can be (:class:`PageLocker`: on its
        background thread while ``locker.in_background()`` lasts); ``held(pieces)`` once it is."""

        def keep(pinned: bool) -> None:
            self._arenas.append((arena, pinned, pieces))
            if not pinned:
                self.pageable_bytes += arena.numel()
            elif held is not None:
                held(pieces)

        self.locker.lock(name, arena, keep, read_only=read_only)

    def _pack_encoded(self, name: str, pieces: list[Piece], filler: Filler, cached: dict[int, Encoded]) -> None:
        """Keep the cached pieces' bytes, and encode the others a batch at a time (their raw bytes filled into a
        scratch buffer, then encoded), keeping only the compressed bytes. Host memory grows by one batch of raw
        bytes beyond the weights at most."""
        for piece in pieces:
            if id(piece) in cached:
                piece.layout()
                self._keep(name, piece, cached[id(piece)])
                self.cached_pieces += 1
        pieces = [piece for piece in pieces if id(piece) not in cached]
        batches: list[list[Piece]] = [[]]
        for piece in pieces:
            piece.layout()
            if batches[-1] and sum(p.nbytes for p in batches[-1]) + piece.nbytes > ENCODE_BATCH_BYTES:
                batches.append([])
            batches[-1].append(piece)
        if not pieces:
            return
        progress = _progress(f"compressing {name}", sum(p.nbytes for p in pieces))
        for batch in batches:
            scratch = [host_buffer(piece.nbytes) for piece in batch]
            for piece, raw in zip(batch, scratch, strict=True):
                piece.host = raw
            filler.fill(batch)  # read from the checkpoint files where the tensors are mapped views of them
            for piece, encoded in zip(batch, self._encode(scratch), strict=True):
                buffer = host_buffer(encoded.payload.numel())
                buffer.copy_(encoded.payload)
                encoded.payload = buffer
                self._keep(name, piece, encoded)
                self.encoded_pieces += 1
                progress(piece.nbytes)
            del scratch
        progress(None)

    def _keep(self, name: str, piece: Piece, encoded: Encoded) -> None:
        """Keep ``encoded`` (its payload in a host buffer of its own) as ``piece``'s bytes, and bind its tensors
        to placeholders: the raw bytes are freed as soon as no holder is left."""
        piece.encoded = encoded
        piece.host = None
        for ref in piece.refs:
            ref.host = placeholder(ref.shape, ref.dtype)
            ref.bind(ref.host)
        buffer = encoded.payload
        self._hold(name, buffer, [piece])
        self.encoded_raw_bytes += piece.nbytes
        self.encoded_bytes += buffer.numel()

    def _encode(self, raws: list[torch.Tensor]) -> list[Encoded]:
        return encode_piece(self.codec, raws)

    def release(self, pieces: list[Piece]) -> None:
        """Forget ``pieces`` (replaced by pieces packed again): an arena none of whose pieces is left is unpinned and
        freed once the last view of it goes; one that still holds other pieces stays whole."""
        gone = {id(piece) for piece in pieces}
        kept = []
        for arena, pinned, held in self._arenas:
            left = [piece for piece in held if id(piece) not in gone]
            if left:
                kept.append((arena, pinned, left))
                continue
            size = arena.numel()
            if pinned:
                self.locker.unlock(arena)
            else:
                self.pageable_bytes -= size
            self._let_go(arena)
            for piece in held:
                if piece.encoded is not None:
                    self.encoded_bytes -= size
                    self.encoded_raw_bytes -= piece.nbytes
        self._arenas = kept
        for piece in self._mapped:
            if id(piece) in gone:
                self.mapped_bytes -= piece.nbytes
        self._mapped = [piece for piece in self._mapped if id(piece) not in gone]
        for piece in pieces:
            piece.host = None
            piece.encoded = None
            piece.mapped = False

    def _let_go(self, arena: torch.Tensor) -> None:
        shared = self._shared.pop(id(arena), None)
        if shared is not None:
            shared.close()
            self.shared_bytes -= arena.numel()

    def restore(self) -> None:
        """Give every tensor back its own storage on its original device and free the arenas one by one.

        Host memory peaks at the weights plus one arena, not twice the weights.
        """
        for piece in self._mapped:
            for ref in piece.refs:
                # On the CPU the file view is the tensor as it was before offload; elsewhere a copy of it.
                home = ref.original_device
                ref.bind(ref.host if home.type == "cpu" else _own_copy(ref, home))
                ref.host = None
            piece.mapped = False
        self._mapped = []
        while self._arenas:
            arena, pinned, pieces = self._arenas.pop(0)
            for piece in pieces:
                if piece.encoded is not None:
                    # Decoded into a scratch buffer of its own; the tensors are then copied out of it as usual.
                    piece.host = torch.empty(piece.encoded.nbytes, dtype=torch.uint8)
                    piece.encoded.decode_into(piece.host)
                    _view_refs(piece)
                for ref in piece.refs:
                    home = ref.original_device
                    # clone(): a tensor of its own, so nothing shares storage after remove (safetensors
                    # refuses to save tensors that share memory).
                    ref.bind(_own_copy(ref, home))
                    ref.host = None
                piece.host = None
                piece.encoded = None
            if pinned:
                self.locker.unlock(arena)
            self._let_go(arena)
            del arena


#: Raw bytes encoded at once: large enough for a batched GPU encode to run at speed, small enough that the
#: scratch copy stays a small share of host memory.
ENCODE_BATCH_BYTES = 1 << 30


def _view_refs(piece: Piece) -> None:
    """Point each ref's ``host`` at its view in ``piece.host``."""
    inner = 0
    for ref in piece.refs:
        ref.host = rebuild(ref.layout, view_in(piece.host[inner : inner + ref.nbytes]))
        inner = align(inner + ref.nbytes)


def _progress(what: str, total: int):
    """A progress callback: a tqdm bar on a terminal when tqdm is installed, else log lines; ``None`` closes it."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, desc=what, unit="B", unit_scale=True, disable=None, leave=False)

        def update(nbytes):
            bar.update(nbytes) if nbytes is not None else bar.close()

        return update
    logger.info("%s (%s)", what, format_bytes(total))
    return lambda nbytes: None
