"""The compressed cache: pieces' compressed bytes kept beside their checkpoint, read at ``apply`` instead of
compressing the pieces again (``vramferry compress`` writes it: :mod:`vramferry.compressor`).

Layout: a folder (``MODEL_DIR/.vramferry/compressed`` unless given) holding ``index.json`` and one file per piece
and codec, ``<codec>/<component>/<piece>.bin``: the piece's compressed chunks back to back, as the codec made them.
The index holds, per codec and piece (a component's non-block part, or one block), the codec's format and chunk
size, the chunk table with a CRC-32 of every compressed chunk, the SHA-256 of the raw bytes, and the source of every
tensor: its name, dtype and shape, the checkpoint file it was read from, its offset there, and that file's size,
modification time (ns) and the SHA-256 of its safetensors header.

When an entry is used (:meth:`CompressedCache.mismatch`): same codec format and chunk size; the piece holds the
same tensors (names, dtypes, shapes, in order); each tensor is, right now, a clean memory-mapped view of a
checkpoint file (so its bytes are that file's bytes) at the recorded offset; and that file's size, modification time
and header are the recorded ones. The raw bytes are then never read: that is the point. Reading the entry's file
checks its size and every chunk's CRC. Anything else (a tensor converted to another dtype or changed in memory, a
file written since, a corrupt or missing cache file) leaves the piece to be compressed at ``apply`` as without a
cache, with one warning naming the pieces and the command that rebuilds them. What the rule cannot see is a file
rewritten in place with other bytes of the same size and the same modification time to the nanosecond; ``vramferry
compress --verify`` reads the raw bytes and checks them against the recorded SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zlib
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LoadError
from ..planning.codec import CHUNK_BYTES
from .arenas import host_buffer
from .codecs import Chunk, Codec, Encoded
from .files import FileMap, FileReader, Region
from .pieces import Piece

logger = logging.getLogger(__name__)

#: Where ``vramferry compress`` writes, inside the model's folder.
CACHE_DIR = Path(".vramferry") / "compressed"
INDEX = "index.json"
FORMAT = "vramferry compressed cache"
VERSION = 1
#: Pieces named in the warning about unusable entries; the rest are counted.
NAMED = 4


def default_cache_dir(model_dir: str | os.PathLike) -> Path:
    """The cache folder of a model folder: ``MODEL_DIR/.vramferry/compressed``."""
    return Path(model_dir).expanduser() / CACHE_DIR


@dataclass(frozen=True)
class FileIdentity:
    """What says a checkpoint file is the one compressed: its size, modification time and header's digest."""

    size: int
    mtime_ns: int
    header: str


def file_identity(path: str) -> FileIdentity | None:
    """``path``'s identity; ``None`` when it cannot be read. The header is a safetensors file's JSON header (the
    tensors' names, dtypes, shapes and offsets), read with its 8-byte length; other files hash their first 4 KiB."""
    try:
        stat = os.stat(path)
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            head += f.read(length if 0 < length <= 100 * 2**20 else 4096 - len(head))
    except OSError:
        return None
    return FileIdentity(stat.st_size, stat.st_mtime_ns, hashlib.sha256(head).hexdigest())


def tensor_names(modules) -> dict[int, str]:
    """Module id -> its dotted path inside its component, prefixed by the component's name."""
    names: dict[int, str] = {}
    for component in modules.components():
        for path, module in component.module.named_modules():
            names.setdefault(id(module), f"{component.name}.{path}" if path else component.name)
    return names


def piece_tensors(piece: Piece, names: dict[int, str]) -> list[str]:
    """The names of ``piece``'s tensors, in layout order (each by its first holder)."""
    found = []
    for ref in piece.refs:
        module, attr = ref.owners[0]
        found.append(f"{names.get(id(module), '?')}.{attr}")
    return found


def raw_digest(raw: torch.Tensor) -> str:
    """SHA-256 of a piece's raw bytes (a flat uint8 host tensor); releases the GIL, so threads run in parallel."""
    return hashlib.sha256(raw.numpy()).hexdigest()


class CompressedCache:
    """One cache folder, for one codec: reads entries that match the weights, writes new ones.

    Args:
        folder: the cache folder (holding ``index.json``).
        codec: the codec whose entries are read and written (others are kept as they are).
        modules: the pipeline's modules (tensor names).
        data: the index as read (``None``: empty).
    """

    def __init__(self, folder: Path, codec: Codec, modules, data: dict | None = None) -> None:
        self.folder = Path(folder)
        self.codec = codec
        self.names = tensor_names(modules)
        self.data = data or {"format": FORMAT, "version": VERSION, "entries": {}}
        self.entries: dict[str, dict] = self.data["entries"].setdefault(codec.name, {})
        self._identities: dict[str, FileIdentity | None] = {}
        self.source_dir: str | None = None  # the folder the pipeline was loaded from, when known
        self.used = 0  # pieces read from the cache
        self.stale: list[tuple[str, str]] = []  # (piece, why its entry was not used)

    @classmethod
    def open(cls, folder: Path, codec: Codec, modules) -> CompressedCache:
        """The cache in ``folder``; raises ``ValueError`` (saying why) when its index cannot be read."""
        path = Path(folder) / INDEX
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"its index {path} cannot be read ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            raise ValueError(f"{path} is not a vramferry compressed cache index")
        if data.get("version") != VERSION:
            raise ValueError(f"{path} is version {data.get('version')!r}; this vramferry reads version {VERSION}")
        return cls(Path(folder), codec, modules, data)

    @property
    def model_dir(self) -> str:
        """The model folder (for the rebuild command): the pipeline's, else the one the cache was made from."""
        return str(self.source_dir or self.data.get("model_dir") or self.folder.parent.parent)

    def identity(self, path: str) -> FileIdentity | None:
        if path not in self._identities:
            self._identities[path] = file_identity(path)
        return self._identities[path]

    # -- reading ------------------------------------------------------------------------------------------------
    def mismatch(self, piece: Piece, files: FileMap) -> str | None:
        """Why ``piece``'s entry does not hold its bytes (``None``: it does; see the module docstring)."""
        entry = self.entries.get(piece.name)
        if entry is None:
            return "no entry"
        try:
            return self._mismatch(entry, piece, files)
        except (KeyError, TypeError, ValueError, AttributeError):
            return "its index entry is unreadable"

    def _mismatch(self, entry: dict, piece: Piece, files: FileMap) -> str | None:
        if entry["codec_format"] != self.codec.format:
            return f"made by {entry['codec_format']}, not {self.codec.format}"
        if entry["chunk_bytes"] != CHUNK_BYTES:
            return f"made in chunks of {entry['chunk_bytes']} bytes, not {CHUNK_BYTES}"
        tensors = entry["tensors"]
        if [t["name"] for t in tensors] != piece_tensors(piece, self.names):
            return "it holds other tensors than the ones compressed"
        for ref, tensor in zip(piece.refs, tensors, strict=True):
            if tensor["dtype"] != str(ref.dtype) or tensor["shape"] != list(ref.shape):
                was = f"{tensor['dtype']} {tensor['shape']}"
                return f"{tensor['name']} is {ref.dtype} {list(ref.shape)}, compressed as {was}"
        if entry["nbytes"] != piece.layout():
            return "it is laid out otherwise than when it was compressed"
        for ref, tensor in zip(piece.refs, tensors, strict=True):
            region = files.region(ref.current())
            if region is None:
                return (
                    f"{tensor['name']} is not a mapped view of a checkpoint file (converted to another dtype, "
                    "changed, or copied into memory, as remove() does)"
                )
            known = FileIdentity(**entry["files"][tensor["file"]])
            if region.offset != tensor["offset"] or self.identity(region.path) != known:
                return f"{tensor['file']} changed since it was compressed"
        return None

    def read(
        self, pieces: list[Piece], files: FileMap, pool: Executor | None = None, done: Any = None
    ) -> dict[int, Encoded]:
        """The encoded bytes of each of ``pieces`` whose entry matches it, by piece id, each in a host buffer of
        its own; pieces without an entry are left out silently, those whose entry does not match (or whose file
        is missing or corrupt) with the reason kept in :attr:`stale`. ``done`` is called with bytes as they land."""
        wanted = []
        for piece in pieces:
            why = self.mismatch(piece, files)
            if why is None:
                why = self._file_problem(self.entries[piece.name])
            if why == "no entry":
                continue
            if why is not None:
                self.stale.append((piece.name, why))
                continue
            wanted.append((piece, self.entries[piece.name]))
        buffers = [host_buffer(entry["payload_bytes"]) for _piece, entry in wanted]
        reader = FileReader()
        try:
            paths = [str(self._path(entry)) for _piece, entry in wanted]
            reader.read([(Region(path, 0, b.numel()), b) for path, b in zip(paths, buffers, strict=True)], pool, done)
        except LoadError as exc:  # a cache file that vanished or shrank since it was checked: compress instead
            self.stale.extend((piece.name, str(exc)) for piece, _entry in wanted)
            return {}
        finally:
            reader.close()
        checks = [(b, c) for (_p, e), b in zip(wanted, buffers, strict=True) for c in e["chunks"]]
        run = pool.map if pool is not None else map
        bad = {id(b) for (b, _c), ok in zip(checks, run(_chunk_intact, checks), strict=True) if not ok}
        found = {}
        for (piece, entry), buffer in zip(wanted, buffers, strict=True):
            if id(buffer) in bad:
                self.stale.append((piece.name, f"{entry['file']} is corrupt (a chunk's CRC-32 differs)"))
                continue
            chunks = tuple(Chunk(*chunk[:5]) for chunk in entry["chunks"])
            found[id(piece)] = Encoded(self.codec, buffer, entry["nbytes"], chunks)
        self.used += len(found)
        return found

    def _path(self, entry: dict) -> Path:
        path = (self.folder / entry["file"]).resolve()
        if self.folder.resolve() not in path.parents:
            raise ValueError(f"{entry['file']} lies outside the cache folder")
        return path

    def _file_problem(self, entry: dict) -> str | None:
        """Why ``entry``'s file cannot hold its bytes: missing, of another size, or a chunk table that does not
        tile the piece and the file (``None``: none of these)."""
        try:
            path = self._path(entry)
            raw_at = at = 0
            for chunk in entry["chunks"]:
                raw_start, raw_len, start, length, _split, _crc = chunk
                if not all(type(x) is int for x in chunk) or (raw_start, start) != (raw_at, at):
                    return f"{entry['file']}: its chunk table is corrupt"
                if raw_len <= 0 or length <= 0:
                    return f"{entry['file']}: its chunk table is corrupt"
                raw_at, at = raw_at + raw_len, at + length
            if (raw_at, at) != (entry["nbytes"], entry["payload_bytes"]):
                return f"{entry['file']}: its chunk table is corrupt"
        except (KeyError, TypeError, ValueError):
            return "its index entry is unreadable"
        try:
            size = path.stat().st_size
        except OSError:
            return f"{entry['file']} is missing"
        if size != entry["payload_bytes"]:
            return f"{entry['file']} holds {size} bytes, not {entry['payload_bytes']} (truncated or replaced)"
        return None

    def report(self, compressed_now: int) -> None:
        """One warning naming the pieces whose entries were not used (and the command that rebuilds them), and
        one info line counting what came from the cache."""
        if self.stale:
            named = ", ".join(f"{name} ({why})" for name, why in self.stale[:NAMED])
            more = f" and {len(self.stale) - NAMED} more" if len(self.stale) > NAMED else ""
            logger.warning(
                "vramferry: the compressed cache in %s does not match %d piece(s), compressed now instead: %s%s; "
                "rebuild it with `%s`",
                self.folder,
                len(self.stale),
                named,
                more,
                self.rebuild_command(),
            )
        logger.info(
            "vramferry: compressed bytes of %d piece(s) read from the cache in %s, %d compressed now",
            self.used,
            self.folder,
            compressed_now,
        )

    def rebuild_command(self) -> str:
        command = f"vramferry compress {self.model_dir}"
        if self.folder.resolve() != default_cache_dir(self.model_dir).resolve():
            command += f" --cache-dir {self.folder}"
        return command

    # -- writing ------------------------------------------------------------------------------------------------
    def put(
        self,
        piece: Piece,
        encoded: Encoded,
        regions: list[Region],
        identities: dict[str, FileIdentity],
        digest: str,
        model_dir: Path,
    ) -> None:
        """Write ``piece``'s compressed bytes to its file and its entry to the index (saved by :meth:`save`).

        Args:
            regions: where each of its tensors was read from, in layout order.
            identities: each source file's identity, taken before its bytes were read.
            digest: :func:`raw_digest` of its raw bytes.
            model_dir: the model folder (source files inside it are recorded by their path relative to it).
        """
        suffix = "rest" if piece.name.endswith(":rest") else piece.name[len(piece.component) + 1 :]
        relative = "/".join(_safe(part) for part in (self.codec.name, piece.component, suffix)) + ".bin"
        path = self.folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_replacing(path, encoded.payload.numpy())
        keys = [_file_key(region.path, model_dir) for region in regions]
        self.entries[piece.name] = {
            "component": piece.component,
            "file": relative,
            "codec_format": self.codec.format,
            "codec_params": self.codec.params,
            "chunk_bytes": CHUNK_BYTES,
            "nbytes": encoded.nbytes,
            "payload_bytes": encoded.payload.numel(),
            "chunks": [
                [c.raw_start, c.raw_len, c.start, c.length, c.split, _crc(encoded.payload, c.start, c.length)]
                for c in encoded.chunks
            ],
            "raw_sha256": digest,
            "tensors": [
                {"name": name, "dtype": str(ref.dtype), "shape": list(ref.shape), "file": key, "offset": at.offset}
                for name, ref, key, at in zip(piece_tensors(piece, self.names), piece.refs, keys, regions, strict=True)
            ],
            "files": {key: asdict(identities[region.path]) for key, region in zip(keys, regions, strict=True)},
        }

    def remove(self, name: str) -> None:
        """Drop ``name``'s entry and its file."""
        entry = self.entries.pop(name, None)
        if entry is not None:
            try:
                self._path(entry).unlink(missing_ok=True)
            except (OSError, ValueError, KeyError, TypeError):
                pass

    def save(self, model_dir: Path) -> None:
        """Write the index (atomically: a reader sees the old one or the new one)."""
        self.data["model_dir"] = str(Path(model_dir).resolve())
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_replacing(self.folder / INDEX, json.dumps(self.data, indent=1).encode())

    @property
    def compressed_bytes(self) -> int:
        return sum(int(entry.get("payload_bytes", 0)) for entry in self.entries.values())


def open_cache(pipeline: object, setting: str, codec: Codec | None, modules) -> CompressedCache | None:
    """The cache ``apply`` reads for ``setting`` (``OffloadConfig.compression_cache``), or ``None``: no codec,
    ``"off"``, no folder to look in, or no cache there. An unreadable cache is one warning, and ``None``."""
    if codec is None or setting == "off":
        return None
    if setting == "auto":
        name = getattr(getattr(pipeline, "config", None), "_name_or_path", None)
        if not isinstance(name, (str, os.PathLike)) or not Path(name).expanduser().is_dir():
            return None
        folder, source = default_cache_dir(name), str(Path(name).expanduser())
        if not (folder / INDEX).exists():
            return None
    else:
        folder, source = Path(setting).expanduser(), None
        if not (folder / INDEX).exists():
            logger.warning(
                "vramferry: compression_cache=%r holds no compressed cache (no %s); compressing at apply. Write one "
                "with `vramferry compress MODEL_DIR --cache-dir %s`",
                setting,
                INDEX,
                setting,
            )
            return None
    try:
        cache = CompressedCache.open(folder, codec, modules)
    except ValueError as exc:
        logger.warning(
            "vramferry: the compressed cache in %s is not used: %s; compressing at apply. Rebuild it with "
            "`vramferry compress MODEL_DIR` (after removing %s)",
            folder,
            exc,
            folder,
        )
        return None
    cache.source_dir = source
    return cache


def prefetch_paths(model_dir: Path, setting: str, device_type: str) -> list[str] | None:
    """What :func:`vramferry.load` asks the kernel to read ahead when ``model_dir`` has a compressed cache for the
    codec of ``device_type``: its files, and the checkpoint files none of its entries were read from (the files
    that entries cover are read where needed, and mostly not at all). ``None``: no such cache (read ahead the
    whole checkpoint)."""
    from .codecs import DEVICE_CODECS

    if setting == "off" or device_type not in DEVICE_CODECS:
        return None
    folder = default_cache_dir(model_dir) if setting == "auto" else Path(setting).expanduser()
    try:
        data = json.loads((folder / INDEX).read_text())
        entries = data["entries"].get(DEVICE_CODECS[device_type]) or {}
        covered = {Path(model_dir, key).resolve() for entry in entries.values() for key in entry["files"]}
        payloads = [str(folder / entry["file"]) for entry in entries.values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not entries:
        return None
    files = sorted(p for p in Path(model_dir).rglob("*.safetensors") if folder not in p.parents)
    return payloads + [str(p) for p in files if p.resolve() not in covered]


def _chunk_intact(check: tuple[torch.Tensor, list]) -> bool:
    buffer, (_raw_start, _raw_len, start, length, _split, crc) = check
    return _crc(buffer, start, length) == crc


def _crc(payload: torch.Tensor, start: int, length: int) -> int:
    # zlib releases the GIL for large buffers: chunks are checked on threads in parallel.
    return zlib.crc32(payload[start : start + length].numpy())


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", part) or "_"


def _file_key(path: str, model_dir: Path) -> str:
    """A source file's name in the index: relative to the model folder when inside it, else as it is."""
    relative = os.path.relpath(os.path.realpath(path), os.path.realpath(model_dir))
    return path if relative.startswith("..") else relative


def _write_replacing(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed over it: never half a file under its name."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, path)
