"""``compress(model_dir, config)``: write the compressed cache beside a local checkpoint (``vramferry compress``).

Compressing at ``apply`` costs time on every start (about 30 s for FLUX.1's transformer); the cache does it once.
Each piece the plan would keep compressed (every piece a codec could keep, with ``compression="lossless"``) is
read straight from the checkpoint files, its SHA-256 taken, compressed and written with its index entry
(:mod:`vramferry.runtime.cache`); ``apply`` and :func:`vramferry.load` then read the compressed bytes of every piece
whose entry matches the weights, instead of reading the raw bytes and compressing them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Compression, OffloadConfig
from .errors import LoadError, OffloadError
from .runtime.arenas import host_buffer
from .runtime.cache import CompressedCache, FileIdentity, default_cache_dir, file_identity, raw_digest
from .runtime.codecs import Codec, encode_piece
from .runtime.files import FileMap, Region
from .runtime.fill import Filler, progress_bar
from .runtime.pieces import Piece
from .runtime.store import ENCODE_BATCH_BYTES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressReport:
    """What :func:`compress` did.

    Attributes:
        cache_dir: the cache folder.
        codec: the codec's name.
        written: pieces compressed and written now.
        kept: pieces whose entries already matched the weights (left as they were).
        raw_bytes, compressed_bytes: the written pieces' raw bytes and their compressed bytes.
        seconds: the time reading, hashing, compressing and writing took.
        not_from_files: pieces left out because some of their weights are not read from the checkpoint files
            (built in memory when loading, or tied): ``apply`` compresses those itself.
        removed: entries dropped because they no longer match the weights (or name pieces the pipeline lacks).
        nothing: why nothing was chosen to compress (``None`` when something was).
    """

    cache_dir: Path
    codec: str
    written: int = 0
    kept: int = 0
    raw_bytes: int = 0
    compressed_bytes: int = 0
    seconds: float = 0.0
    not_from_files: tuple[str, ...] = ()
    removed: int = 0
    nothing: str | None = None


def compress(
    model: str | os.PathLike,
    config: OffloadConfig | None = None,
    *,
    codec: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    components: Iterable[str] | None = None,
    rehash: bool = False,
    progress: bool | None = None,
    **changes: Any,
) -> CompressReport:
    """Compress the pieces of the pipeline in ``model`` that ``config``'s plan keeps compressed, into its cache.

    Args:
        model: a local folder written by ``save_pretrained``. Its pipeline is loaded in the files' own dtypes:
            the cache serves runs that load it so (``dtype="bfloat16"`` for a bf16 checkpoint).
        config: the offload config of the runs the cache is for: with ``compression="lossless"`` every piece a
            codec could keep compressed is compressed; otherwise those that ``apply``'s plan on this machine
            would compress (so give the same mode and ``vram_budget`` as those runs).
        codec: ``"nvcomp-ans"`` or ``"zstd-planes"``; default: the execution device's codec.
        cache_dir: the cache folder; default ``model/.vramferry/compressed``.
        components: compress only these components.
        rehash: also read the raw bytes of pieces whose entries match, and make again those whose SHA-256 or
            compressed chunks' CRC-32 differ from the recorded ones (catches files rewritten in place with the same
            size and modification time).
        progress: a progress bar (bytes, GB/s); ``None``: when vramferry logs at INFO level.
        **changes: field overrides applied to a copy of ``config``.

    Raises:
        LoadError: ``model`` is not a local pipeline folder.
        OffloadError: an unknown component, or a codec that cannot run here.
    """
    from .discovery.roles import discover
    from .pipelines.loading import load_pipeline
    from .runtime.install import collect_pieces

    config = (config if config is not None else OffloadConfig()).replace(**changes)
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise LoadError(
            f"{str(model)!r} is not a folder: vramferry compress writes its cache beside a local checkpoint (a "
            "folder written by save_pretrained)"
        )
    # In the files' own dtypes: a tensor converted on loading is no view of its file, and no entry can serve it.
    dtypes = checkpoint_dtypes(folder)
    same = set(dtypes.values())
    pipeline = load_pipeline(folder, dtype=same.pop() if len(same) == 1 else dtypes or None)
    modules = discover(pipeline, strict=config.strict, block_attrs=dict(config.block_attrs) or None)
    pieces, _shared = collect_pieces(modules)
    chosen, nothing = _chosen(pipeline, modules, pieces, config, components)
    the_codec = _codec(codec, config)
    cache = _cache_for(Path(cache_dir).expanduser() if cache_dir else default_cache_dir(folder), the_codec, modules)
    if not chosen:
        return CompressReport(cache.folder, the_codec.name, nothing=nothing)
    job = _Job(cache, the_codec, folder, rehash)
    try:
        report = job.run(chosen, pieces, progress)
    finally:
        job.close()
    return report


#: safetensors' dtype names -> torch dtypes (the dtypes a pipeline loads in).
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def checkpoint_dtypes(folder: Path) -> dict[str, torch.dtype]:
    """Per component folder of ``folder``, the dtype that holds most of its safetensors bytes (variant files,
    ``*.fp16.safetensors``, left out); components in other dtypes (quantized) are left out."""
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        sizes: Counter[str] = Counter()
        for path in sorted(sub.glob("*.safetensors")):
            if len(path.name.split(".")) != 2:
                continue
            for name, info in safetensors_header(path).items():
                if name != "__metadata__" and isinstance(info, dict):
                    start, end = info.get("data_offsets", (0, 0))
                    sizes[str(info.get("dtype"))] += end - start
        if sizes and (dtype := SAFETENSORS_DTYPES.get(sizes.most_common(1)[0][0])) is not None:
            found[sub.name] = dtype
    return found


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (``{}`` when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= 100 * 2**20:
                return {}
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        return {}
    return header if isinstance(header, dict) else {}


def _chosen(pipeline, modules, pieces: dict[str, list[Piece]], config: OffloadConfig, only) -> tuple[list, str]:
    """The pieces to compress, and when there are none, why."""
    from .api import plan_apply
    from .discovery.inventory import inventory_of
    from .planning.codec import codec_estimate
    from .runtime.codecs import estimated_ratios
    from .runtime.install import compressed_pieces

    names = [c.name for c in modules.components()]
    wanted = set(names) if only is None else set(only)
    unknown = sorted(wanted - set(names))
    if unknown:
        raise OffloadError(f"components: {', '.join(unknown)} not in the pipeline; it has {', '.join(names)}")
    if config.compression is Compression.OFF:
        return [], "compression='off' compresses nothing"
    if config.compression is Compression.LOSSLESS:
        estimate = codec_estimate(inventory_of(modules), estimated_ratios(modules))
        chosen = [p for name in estimate.ratios for p in pieces[name]]
        why = "no component's weights compress (tensor subclasses, or bytes an entropy coder cannot shrink)"
    else:
        _modules, device, _planning, plan, coding = plan_apply(pipeline, config)
        moved = compressed_pieces(modules, pieces, plan)
        chosen = [p for group in pieces.values() for p in group if id(p) in moved]
        why = (
            f"the plan for these options on {device} compresses nothing"
            + (f" ({coding.missing})" if coding.missing else "")
            + "; give the offload options of the runs the cache is for (--offload, --vram-budget), or "
            "--compression lossless to compress every piece"
        )
    chosen = [p for p in chosen if p.component in wanted and p.encodable]
    return chosen, why if not chosen else None


def _codec(name: str | None, config: OffloadConfig) -> Codec:
    from .runtime.codecs import codec_for, codec_named

    device = config.device
    if name is None:
        if device.type == "cuda" and not torch.cuda.is_available():
            device = torch.device("cpu")
        return codec_for(device)
    return codec_named(name, device if device.type == "cuda" else torch.device("cuda"))


def _cache_for(folder: Path, codec: Codec, modules) -> CompressedCache:
    """The cache in ``folder`` to add to; an unreadable one is started afresh (with a warning)."""
    if not folder.exists():
        return CompressedCache(folder, codec, modules)
    try:
        return CompressedCache.open(folder, codec, modules)
    except ValueError as exc:
        logger.warning("vramferry compress: %s; writing a new index", exc)
        return CompressedCache(folder, codec, modules)


class _Job:
    """Reads, hashes, compresses and writes pieces a batch at a time (host memory: one batch of raw bytes)."""

    def __init__(self, cache: CompressedCache, codec: Codec, model_dir: Path, rehash: bool) -> None:
        self.cache = cache
        self.codec = codec
        self.model_dir = model_dir
        self.rehash = rehash
        self.files = FileMap.current()
        self.filler = Filler(self.files, bind=False)  # the pipeline is read, never changed
        self.written = self.kept = self.raw_bytes = self.compressed_bytes = 0

    def run(self, chosen: list[Piece], pieces: dict[str, list[Piece]], progress: bool | None) -> CompressReport:
        start = time.perf_counter()
        todo, outside = [], []
        for piece in chosen:
            piece.layout()
            matches = self.cache.mismatch(piece, self.files) is None
            if matches and not self.rehash:
                self.kept += 1
                continue
            regions = [self.files.region(ref.current()) for ref in piece.refs]
            if any(region is None for region in regions):
                outside.append(piece.name)
                continue
            todo.append((piece, regions, matches))
        removed = self._drop_stale(chosen, pieces, set(outside))
        bar = progress_bar(sum(p.nbytes for p, _r, _m in todo), progress, desc="compressing")
        try:
            for batch in _batches(todo):
                self._batch(batch, bar)
                self.cache.save(self.model_dir)
        finally:
            if bar is not None:
                bar.close()
        if removed or not todo:
            self.cache.save(self.model_dir)
        return CompressReport(
            self.cache.folder,
            self.codec.name,
            self.written,
            self.kept,
            self.raw_bytes,
            self.compressed_bytes,
            time.perf_counter() - start,
            tuple(outside),
            removed,
        )

    def _batch(self, batch: list[tuple[Piece, list[Region], bool]], bar) -> None:
        paths = sorted({region.path for _piece, regions, _m in batch for region in regions})
        before = {path: self.cache.identity(path) for path in paths}
        scratch = [host_buffer(piece.nbytes) for piece, _r, _m in batch]
        for (piece, _r, _m), raw in zip(batch, scratch, strict=True):
            piece.host = raw
        try:
            self.filler.fill([piece for piece, _r, _m in batch])
        finally:
            for piece, _r, _m in batch:
                piece.host = None
        digests = list(self.filler.pool().map(raw_digest, scratch))
        todo = [
            (item, raw, digest)
            for item, raw, digest in zip(batch, scratch, digests, strict=True)
            if not (item[2] and self._intact(item[0], digest))
        ]
        self.kept += len(batch) - len(todo)
        for ((piece, regions, _m), _raw, digest), encoded in zip(
            todo, encode_piece(self.codec, [raw for _item, raw, _d in todo]), strict=True
        ):
            self.cache.put(piece, encoded, regions, _known(before), digest, self.model_dir)
            self.written += 1
            self.raw_bytes += encoded.nbytes
            self.compressed_bytes += encoded.payload.numel()
            if bar is not None:
                bar.update(encoded.nbytes)
        for path in paths:
            # A file written while it was read would leave bytes of two versions under one identity.
            if file_identity(path) != before[path]:
                raise LoadError(f"{path} changed while it was being compressed; run vramferry compress again")

    def _intact(self, piece: Piece, digest: str) -> bool:
        """``rehash``: the recorded SHA-256 is the raw bytes', and the compressed file reads back intact."""
        entry = self.cache.entries[piece.name]
        if entry.get("raw_sha256") != digest:
            return False
        before = len(self.cache.stale)
        found = self.cache.read([piece], self.files, self.filler.pool())
        del self.cache.stale[before:]
        return id(piece) in found

    def _drop_stale(self, chosen: list[Piece], pieces: dict[str, list[Piece]], outside: set[str]) -> int:
        """Drop the entries of this codec that name no piece of the pipeline, or no longer match their piece
        (unless the piece is compressed again now); returns how many."""
        by_name = {p.name: p for group in pieces.values() for p in group}
        redone = {p.name for p in chosen} - outside
        removed = 0
        for name in list(self.cache.entries):
            piece = by_name.get(name)
            if name in redone:
                continue
            if piece is None or self.cache.mismatch(piece, self.files) is not None:
                self.cache.remove(name)
                removed += 1
        return removed

    def close(self) -> None:
        self.filler.close()


def _known(identities: dict[str, FileIdentity | None]) -> dict[str, FileIdentity]:
    missing = [path for path, identity in identities.items() if identity is None]
    if missing:
        raise LoadError(f"{missing[0]} cannot be read; check the checkpoint's files")
    return {path: identity for path, identity in identities.items() if identity is not None}


def _batches(todo: list) -> list[list]:
    batches: list[list] = [[]]
    for item in todo:
        if batches[-1] and sum(p.nbytes for p, _r, _m in batches[-1]) + item[0].nbytes > ENCODE_BATCH_BYTES:
            batches.append([])
        batches[-1].append(item)
    return [batch for batch in batches if batch]
