"""Where a tensor's bytes lie on disk, and large parallel reads of file regions into host memory.

diffusers and transformers load safetensors checkpoints as memory-mapped views of the files (the modules are
built on the meta device, then each parameter is bound to its slice of the mapping): nothing is read until a
page is touched. Copying such a tensor page by page faults the file in 4 KiB at a time and leaves the file pages
mapped in the process beside the copy. Reading the same bytes with a few large ``preadv`` calls on threads goes
at the disk's speed and maps nothing.

A tensor's bytes are taken from its file only when that is exactly the same thing as reading the tensor: it is
contiguous, lies inside one mapping of a regular file, no page of that mapping was ever written (its
``Anonymous`` count in ``/proc/self/smaps`` is 0: a write to a private mapping makes a private copy of the page)
and the file on disk is still the one mapped (same device and inode, not deleted). Anything else is copied from
the tensor as before. Where ``/proc`` is missing (not Linux), nothing is read from files.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import json
import mmap
import os
import re
import struct
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import torch

from ..errors import LoadError

#: Most bytes one read call moves: large enough for the disk's full rate, small enough to spread a file over
#: the threads.
READ_CHUNK = 64 * 2**20

_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)\s+(.*)$")


@dataclass(frozen=True)
class Mapping:
    """One mapping of a regular file into this process."""

    start: int
    end: int
    offset: int  # file offset of ``start``
    path: str
    clean: bool  # no page was written, and the file on disk is the one mapped


@dataclass(frozen=True)
class Region:
    """A byte range of a file."""

    path: str
    offset: int
    nbytes: int


class FileMap:
    """The process's file mappings at one moment (read from ``/proc/self/smaps``), to find tensors' files.

    Args:
        mappings: the mappings; :meth:`current` reads them.
    """

    def __init__(self, mappings: list[Mapping], *, checked: bool = True) -> None:
        self._lazy = False
        self._set(mappings, checked)

    def _set(self, mappings: list[Mapping], checked: bool) -> None:
        self.mappings = sorted(mappings, key=lambda m: m.start)
        self._starts = [m.start for m in self.mappings]
        self._checked = checked  # the mappings' ``clean`` flags come from smaps

    @classmethod
    def current(cls) -> FileMap:
        """This process's file mappings now; none where ``/proc/self/maps`` cannot be read.

        The cheap ``maps`` listing is read first; ``smaps`` (which walks page tables) only when some tensor
        lies in a file mapping, to learn which mappings are clean."""
        made = cls([])
        made._lazy = True
        return made

    def _load(self, smaps: bool) -> None:
        try:
            with open(
                "/proc/self/smaps" if smaps else "/proc/self/maps", encoding="utf-8", errors="replace"
            ) as f:
                text = f.read()
        except OSError:
            text = ""
        self._set(_parse_smaps(text), smaps)
        self._lazy = False

    def region(self, tensor: torch.Tensor) -> Region | None:
        """The file region holding ``tensor``'s bytes, or ``None`` when they cannot be read from a file."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            return None
        if self._lazy:
            self._load(smaps=False)
        nbytes = tensor.numel() * tensor.element_size()
        found = self._find(tensor.data_ptr(), nbytes)
        if found is not None and not self._checked:
            self._load(smaps=True)  # some tensor is file-backed: learn which mappings were written to
            found = self._find(tensor.data_ptr(), nbytes)
        if found is None or not found.clean:
            return None
        return Region(found.path, found.offset + tensor.data_ptr() - found.start, nbytes)

    def _find(self, ptr: int, nbytes: int) -> Mapping | None:
        if nbytes == 0 or not self.mappings:
            return None
        at = bisect.bisect_right(self._starts, ptr) - 1
        if at < 0 or ptr + nbytes > self.mappings[at].end:
            return None
        return self.mappings[at]


def _parse_smaps(text: str) -> list[Mapping]:
    found: list[Mapping] = []
    header: tuple[int, int, int, str, bool] | None = None
    stats: dict[str, os.stat_result | None] = {}
    for line in text.splitlines():
        match = _HEADER.match(line)
        if match is not None:
            if header is not None:
                found.append(Mapping(*header))
            header = _mapping_header(match, stats)
        elif header is not None and line.startswith("Anonymous:"):
            if line.split()[1] != "0":
                header = (*header[:4], False)
    if header is not None:
        found.append(Mapping(*header))
    return found


def _mapping_header(
    match: re.Match, stats: dict[str, os.stat_result | None]
) -> tuple[int, int, int, str, bool] | None:
    start, end, offset, major, minor, inode, path = match.groups()
    path = path.strip()
    if int(inode) == 0 or not path.startswith("/") or path.endswith(" (deleted)"):
        return None
    if path not in stats:
        try:
            stats[path] = os.stat(path)
        except OSError:
            stats[path] = None
    stat = stats[path]
    if stat is None:
        return None
    same = (
        stat.st_ino == int(inode)
        and os.major(stat.st_dev) == int(major, 16)
        and os.minor(stat.st_dev) == int(minor, 16)
    )
    return int(start, 16), int(end, 16), int(offset, 16), path, same


def _writable(tensor: torch.Tensor) -> memoryview:
    """A writable buffer over a contiguous uint8 tensor's bytes (kept alive by the caller)."""
    return memoryview((ctypes.c_char * tensor.numel()).from_address(tensor.data_ptr())).cast("B")


@dataclass
class _Read:
    path: str
    offset: int
    targets: list[torch.Tensor]  # contiguous uint8 slices, filled back to back from ``offset``
    nbytes: int = 0


def plan_reads(items: list[tuple[Region, torch.Tensor]], chunk: int = READ_CHUNK) -> list[_Read]:
    """Group ``(region, destination)`` pairs into reads: regions contiguous in a file are read by one call
    (scattered into their destinations), and no call moves more than ``chunk`` bytes."""
    iov_max = _iov_max()
    reads: list[_Read] = []
    for region, target in sorted(items, key=lambda item: (item[0].path, item[0].offset)):
        flat = target.view(-1)
        for lo in range(0, region.nbytes, chunk):
            piece = flat[lo : lo + chunk]
            last = reads[-1] if reads else None
            if (
                last is not None
                and last.path == region.path
                and last.offset + last.nbytes == region.offset + lo
                and last.nbytes + piece.numel() <= chunk
                and len(last.targets) < iov_max
            ):
                last.targets.append(piece)
                last.nbytes += piece.numel()
            else:
                reads.append(_Read(region.path, region.offset + lo, [piece], piece.numel()))
    return reads


def _iov_max() -> int:
    try:
        return max(1, min(int(os.sysconf("SC_IOV_MAX")), 1024))
    except (ValueError, OSError, AttributeError):
        return 16


class FileReader:
    """Reads file regions into host memory, on a pool of threads when given one; keeps each file open once."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def read(
        self,
        items: list[tuple[Region, torch.Tensor]],
        pool: Executor | None = None,
        done: Callable[[int], None] | None = None,
    ) -> None:
        """Fill each destination (a contiguous uint8 tensor of the region's size) with its region's bytes.

        Args:
            items: ``(region, destination)`` pairs.
            pool: threads to run the reads on; ``None``: this thread.
            done: called with each read's byte count once it landed.

        Raises:
            LoadError: a file cannot be opened or read (it changed or vanished while loading).
        """
        for count in self.start(items, pool):
            count = count.result() if isinstance(count, Future) else count
            if done is not None:
                done(count)

    def start(self, items: list[tuple[Region, torch.Tensor]], pool: Executor | None = None) -> list[Future | int]:
        """Like :meth:`read`, but returns at once with each read's ``Future`` (of its byte count) from ``pool``;
        without ``pool`` the reads are done here and their byte counts returned."""
        reads = plan_reads(items)
        for read in reads:
            self._open(read.path)
        if pool is None:
            return [self._run(read) for read in reads]
        return [pool.submit(self._run, read) for read in reads]

    def _open(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise LoadError(f"cannot open {path!r} to read its weights: {exc.strerror}") from exc
            if hasattr(os, "posix_fadvise"):
                # The kernel reads ahead further for a file it is told is read in order.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._fds[path] = fd
        return fd

    def _run(self, read: _Read) -> int:
        fd = self._fds[read.path]
        buffers = [_writable(target) for target in read.targets]
        offset = read.offset
        try:
            while buffers:
                count = os.preadv(fd, buffers, offset)
                if count == 0:
                    raise LoadError(
                        f"{read.path!r} ends before byte {offset}: the checkpoint changed while loading; "
                        "load it again"
                    )
                offset += count
                buffers = _after(buffers, count)
        except OSError as exc:
            raise LoadError(f"reading {read.path!r} at byte {offset} failed: {exc.strerror}") from exc
        return read.nbytes

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _after(buffers: list[memoryview], count: int) -> list[memoryview]:
    """What is left of ``buffers`` once ``count`` bytes were read into them (a short read)."""
    while buffers and count >= len(buffers[0]):
        count -= len(buffers[0])
        buffers = buffers[1:]
    if buffers and count:
        buffers = [buffers[0][count:], *buffers[1:]]
    return buffers


def available_memory() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes (what the page cache can take without evicting much)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def prefetch(paths: list[str]) -> threading.Thread | None:
    """Ask the kernel to start reading ``paths`` into the page cache now, on a background thread, while the
    pipeline's modules are being built: the reads that fill the host store then find the bytes there.

    Nothing is done when the files would not fit in the available memory (they would evict each other) or the
    platform has no ``posix_fadvise``. Advisory only: a failure changes nothing but the speed.
    """
    free = available_memory()
    sizes = []
    for path in paths:
        try:
            sizes.append(os.path.getsize(path))
        except OSError:
            return None
    if not paths or not hasattr(os, "posix_fadvise") or free is None or sum(sizes) > free // 2:
        return None

    def advise() -> None:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    thread = threading.Thread(target=advise, name="vramferry-prefetch", daemon=True)
    thread.start()
    return thread


#: safetensors dtype names, as torch dtypes.
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def map_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The tensors of a safetensors file as views of one private mapping of it, touching none of their pages.

    safetensors' own loader touches every tensor it returns, and the kernel reads ahead around each touch
    (megabytes at a time, one tensor after another), so building a model from its mapping reads much of the file
    in scattered pieces before anything asks for it. These views read nothing until used; the host store then
    reads their bytes from the file with large parallel reads. A write to one makes a private copy of the page
    (the mapping is copy-on-write), as with safetensors' mapping.

    Returns:
        Name to tensor, or ``None`` when the file is not one this reader handles (a dtype it does not know, a
        malformed header, an unaligned tensor): the caller then loads it as before.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                return None
            header = json.loads(f.read(length))
            region = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        base, found = 8 + length, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer keeps a reference to the mapping; nothing is copied
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                begin, end = entry["data_offsets"]
                if not 0 <= begin <= end <= size - base:
                    return None
                if begin == end:
                    found[name] = torch.empty(entry["shape"], dtype=dtype)
                    continue
                raw = torch.frombuffer(region, dtype=torch.uint8, count=end - begin, offset=base + begin)
                found[name] = raw.view(dtype).reshape(entry["shape"])
        return found
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, struct.error):
        return None


_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class _UntouchedSlice:
    """What safetensors' lazy slice offers (``[...]``, ``[a:b]``, ``get_shape``, ``get_dtype``), over a view."""

    def __init__(self, view: torch.Tensor) -> None:
        self._view = view

    def __getitem__(self, index) -> torch.Tensor:
        return self._view[index]

    def get_shape(self) -> list[int]:
        return list(self._view.shape)

    def get_dtype(self) -> str:
        return _DTYPE_NAMES[self._view.dtype]

    def __getattr__(self, name: str):
        return getattr(self._view, name)


class _UntouchedFile:
    """A ``safe_open`` handle whose tensors and slices are the untouched views of :func:`map_safetensors`."""

    def __init__(self, opened: object, views: dict[str, torch.Tensor]) -> None:
        self._opened = opened
        self._views = views

    def get_slice(self, name: str) -> _UntouchedSlice:
        return _UntouchedSlice(self._views[name])

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._views[name]

    def __getattr__(self, name: str):
        return getattr(self._opened, name)

    def __enter__(self) -> _UntouchedFile:
        return self

    def __exit__(self, *exc) -> object:
        return self._opened.__exit__(*exc)


@contextlib.contextmanager
def untouched_safetensors():
    """While it lasts, the safetensors readers diffusers and transformers build their models with return the
    untouched views of :func:`map_safetensors` for files read on the CPU: ``safetensors.torch.load_file`` (diffusers)
    and the ``safe_open`` transformers' model loader opens each shard with. Files the reader does not handle, other
    devices and other options go to safetensors as before. Not thread-safe: meant for a process loading a pipeline."""
    patched: list[tuple[object, str, object]] = []
    try:
        import safetensors.torch as st
    except ImportError:
        yield
        return
    original_load_file = st.load_file

    def load_file(filename, device="cpu", **kwargs):
        mapped = map_safetensors(filename) if str(device) == "cpu" and not kwargs else None
        return mapped if mapped is not None else original_load_file(filename, device=device, **kwargs)

    patched.append((st, "load_file", load_file))
    try:
        import transformers.modeling_utils as transformers_loading
    except ImportError:  # transformers is optional
        transformers_loading = None
    original_open = getattr(transformers_loading, "safe_open", None)
    if original_open is not None:

        def safe_open(filename, framework="pt", device="cpu", **kwargs):
            opened = original_open(filename, framework=framework, device=device, **kwargs)
            on_cpu = framework in ("pt", "torch") and str(device) == "cpu" and kwargs.get("backend", "mmap") == "mmap"
            views = map_safetensors(filename) if on_cpu else None
            return _UntouchedFile(opened, views) if views is not None else opened

        patched.append((transformers_loading, "safe_open", safe_open))
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    for owner, name, replacement in patched:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
