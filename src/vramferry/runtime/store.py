"""The host store: canonical host copies of weights, packed per unit into contiguous arenas.

A *unit* (:mod:`~vramferry.runtime.pieces`) is a set of tensors that move together (a whole component, the
non-block part of a DiT, or one block). Each unit's tensors are laid out back to back (aligned) in one host
buffer, so that loading a unit is a single large copy, and its device copy is one buffer whose views become the
parameters.

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

import torch

from ..discovery.leaves import align, leaves, rebuild, view_in
from ..units import format_bytes
from .arenas import PageLocker, arena_chunks, host_buffer
from .codecs import Codec, Encoded, encode_piece
from .files import FileMap
from .fill import Filler
from .pieces import Piece, TensorRef, placeholder
from .shared import ArenaBusy, SharedArena, arena_name, open_arena

logger = logging.getLogger(__name__)


def _own_copy(ref: TensorRef, home: torch.device) -> torch.Tensor:
    """``ref``'s tensor with storage of its own on ``home``, rebuilt leaf by leaf from its host copy."""
    copies = {
        id(leaf): tensor.to(home) if home.type != "cpu" else tensor.clone()
        for tensor, leaf in leaves(ref.host, ref.layout)
    }
    return rebuild(ref.layout, lambda leaf: copies[id(leaf)])


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
        self._busy: list[tuple[str, list[Piece], Callable | None]] = []  # shared arenas another process was filling
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
                if not self._pack_raw(name, chunk, filler, held, wait=False):
                    self._busy.append((name, chunk, held))
            if own:
                self.finish_packing(filler)  # a given filler's owner does: the next component's reads follow on
        finally:
            if own:
                filler.close()

    def finish_packing(self, filler: Filler) -> None:
        """After the :meth:`pack` calls that share ``filler``: pack the shared arenas they passed over because
        another process was filling them (found complete by now, most likely, or waited for, and filled here if
        that process died), then wait for the last fill."""
        busy, self._busy = self._busy, []
        for name, chunk, held in busy:
            self._pack_raw(name, chunk, filler, held)
        filler.drain()

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

    def _pack_raw(
        self, name: str, raw: list[Piece], filler: Filler, held: Callable | None, *, wait: bool = True
    ) -> bool:
        """Pack ``raw`` into an arena of its own: filled from the files (or memory), or, in a shared store, found
        filled by another process. ``wait=False``: ``False`` and nothing done when another process is filling
        that shared arena now (this one fills the next arenas meanwhile, instead of waiting)."""
        total = sum(piece.layout() for piece in raw)
        if total == 0:
            return True
        if self.share_dir is None:
            self._pack_private(name, raw, filler, held, total)
            return True
        if wait:
            # Every arena this process is filling is finished first (complete, shared): another process may be
            # waiting for one of them while this one waits for its.
            filler.drain()
        try:
            shared = self._open_shared(arena_name(raw, filler.files), total, wait)
        except ArenaBusy:
            return False
        if shared is None:  # not shareable: a private arena
            self._pack_private(name, raw, filler, held, total)
            return True
        self._lay_out(raw, shared.tensor, views=False)

        def share() -> None:
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

        if shared.complete:
            if filler.progress is not None:
                filler.progress(total)  # another process read them
            share()
        else:
            filler.fill(raw, then=share)
        return True

    def _pack_private(self, name: str, raw: list[Piece], filler: Filler, held: Callable | None, total: int) -> None:
        arena = host_buffer(total)
        self._lay_out(raw, arena, views=False)
        # Page-locked once filled (the fill's threads fault the fresh pages in: the kernel zeroes each on its first
        # touch, where registering first would fault them all in on one thread), while the next arena's first
        # reads run.
        filler.fill(raw, then=lambda: self._hold(name, arena, raw, held=held))

    def _open_shared(self, name: str | None, total: int, wait: bool) -> SharedArena | None:
        """The shared arena ``name`` (``None``: not shareable), or ``None`` and the store private from then on
        when the folder cannot hold it. Raises :class:`ArenaBusy` when ``wait`` is off and another process fills it."""
        shared = open_arena(self.share_dir, name, total, wait=wait) if name is not None else None
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
