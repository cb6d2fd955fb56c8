"""Arenas in shared memory: one host copy of a checkpoint's weights for every process that serves it.

With ``share_host_store``, an arena whose bytes are fully determined (every tensor a clean view of a checkpoint
file, plus at most :data:`MEMORY_BYTES` of tensors built in memory, whose bytes are hashed) lives in a file of
the shared-memory folder (``/dev/shm``), named after a digest of where each byte comes from: the files' paths,
inodes, sizes and modification times, the regions, and the arena's layout. A second process that packs the same
pieces (one process per GPU, Ray Serve replicas) maps that file instead of reading the checkpoint and holding a
copy of its own, and page-locks it in its own address space: host memory holds the weights once, whatever the
number of processes, and copies run at the pinned bandwidth in each.

Locks (``flock``) order the processes: the one that fills an arena holds it exclusively until the last byte and a
trailer that marks it complete are written; the others wait, then share it. A process that dies while filling
leaves no trailer, and the next one fills the arena again. The last process to let go of an arena deletes its
file; files left by processes that were killed are found again by the next process that packs the same pieces,
or can be deleted by hand (``rm /dev/shm/vramferry-*``).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from ..discovery.leaves import leaves
from ..units import format_bytes
from .arenas import mapped_bytes
from .files import FileMap

try:
    import fcntl
except ImportError:  # not a POSIX system: no file locks, no shared arenas
    fcntl = None

logger = logging.getLogger(__name__)

#: The shared-memory folder used when ``share_host_store`` is ``True``.
SHARED_DIR = "/dev/shm"

#: Most bytes of tensors built in memory (not read from a file) an arena may hold and still be shared: their
#: bytes are hashed into its name.
MEMORY_BYTES = 64 * 2**20

_PREFIX = "vramferry-"
_TRAILER = 64  # bytes after the weights: the marker that says the arena is complete
_MAGIC = b"vramferry shared arena v1\n"


def arena_name(pieces: list, files: FileMap) -> str | None:
    """The file name of the shared arena holding ``pieces`` laid out back to back, or ``None`` when their bytes
    are not determined by files (more than :data:`MEMORY_BYTES` built in memory)."""
    digest = hashlib.sha256(_MAGIC)
    in_memory = 0
    stats: dict[str, os.stat_result] = {}
    for piece in pieces:
        digest.update(f"piece {piece.name} {piece.nbytes}\n".encode())
        for ref in piece.refs:
            digest.update(f"ref {ref.offset} {ref.nbytes}\n".encode())
            for tensor, leaf in leaves(ref.current(), ref.layout):
                digest.update(f"leaf {leaf.offset} {leaf.nbytes} {leaf.dtype} {tuple(leaf.shape)}\n".encode())
                region = files.region(tensor)
                if region is not None and region.nbytes == leaf.nbytes:
                    if region.path not in stats:
                        stats[region.path] = os.stat(region.path)
                    st = stats[region.path]
                    digest.update(
                        f"file {region.path} {st.st_ino} {st.st_size} {st.st_mtime_ns} {region.offset}\n".encode()
                    )
                    continue
                in_memory += leaf.nbytes
                if in_memory > MEMORY_BYTES or tensor.device.type != "cpu":
                    return None
                digest.update(b"bytes ")
                digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return _PREFIX + digest.hexdigest()[:40]


@dataclass(eq=False)
class SharedArena:
    """One arena in a shared-memory file, locked for as long as this process holds it."""

    tensor: torch.Tensor  # uint8: while filling, a shared mapping of the file; then :meth:`private`'s
    path: Path
    fd: int
    complete: bool  # another process filled it: nothing to read

    def finish(self) -> None:
        """Mark the arena complete (after this process filled it) and share it with the processes waiting."""
        trailer = _MAGIC + bytes(_TRAILER - len(_MAGIC))
        os.pwrite(self.fd, trailer, self.tensor.numel())
        fcntl.flock(self.fd, fcntl.LOCK_SH)  # the waiting processes may map it now
        self.complete = True

    def private(self) -> torch.Tensor:
        """The complete arena as a private mapping of the file: its pages are the shared ones until written, and a
        write (a weight changed in place, such as a LoRA fused into it) makes a copy of the page for this process
        alone instead of changing every process's weights. The tensors view it; copies to the device read
        :meth:`for_copies`'s mapping."""
        region = mmap.mmap(self.fd, self.tensor.numel(), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.tensor = mapped_bytes(region, huge=True)
        return self.tensor

    def for_copies(self) -> torch.Tensor:
        """The complete arena as a read-only shared mapping of the file: the source of copies to the device.
        Page-locked read-only, its pages stay the shared ones; page-locking even the private mapping read-only
        would copy every page, as Linux unshares the pages of a copy-on-write mapping that a device pins for long.
        A weight written in place in this process (its page in :meth:`private`'s mapping) is not seen here: the
        store packs again what changed as it finds it (an adapter fused or unfused)."""
        region = mmap.mmap(self.fd, self.tensor.numel(), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        return mapped_bytes(region, huge=True)

    def __post_init__(self) -> None:
        # Also when the process ends without removing its handle: the last process still deletes the file.
        self._release = weakref.finalize(self, _let_go, self.fd, self.path)

    def close(self) -> None:
        """Let go of the arena (its mapping lives on while tensors view it); the last process deletes the file."""
        self._release()


def _let_go(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # another process holds it
    else:
        path.unlink(missing_ok=True)
    os.close(fd)


class ArenaBusy(Exception):
    """Another process is filling the arena now (:func:`open_arena` told not to wait)."""


def open_arena(folder: str, name: str, nbytes: int, *, wait: bool = True) -> SharedArena | None:
    """The shared arena ``name`` of ``nbytes`` in ``folder``: complete when another process filled it, else
    locked for this process to fill (then :meth:`SharedArena.finish`). ``None`` (with a warning) when the folder
    cannot hold it; the caller then packs a private arena.

    Args:
        wait: wait while another process fills it. A process must not wait holding an arena it has not
            finished: the other may be waiting for that one.

    Raises:
        ArenaBusy: ``wait`` is off and another process is filling it.
    """
    path = Path(folder) / name
    if fcntl is None:
        logger.warning("vramferry: shared host stores need POSIX file locks: keeping a private copy")
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        logger.warning("vramferry: cannot share the host store in %s (%s): keeping a private copy", folder, exc)
        return None
    try:
        complete = _wait_complete(fd, nbytes, wait)
        if complete is None:
            os.close(fd)  # the process filling it holds it: nothing to delete
            raise ArenaBusy(name)
        if not complete:
            # This process fills it (holding it exclusively). Space is reserved first: a write past what the
            # folder can hold would kill the process (SIGBUS), where this fails cleanly.
            os.ftruncate(fd, 0)
            os.posix_fallocate(fd, 0, nbytes + _TRAILER)
        region = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError) as exc:
        _let_go(fd, path)  # deleted unless another process holds it
        logger.warning(
            "vramferry: cannot share %s of host store in %s (%s): keeping a private copy",
            format_bytes(nbytes),
            folder,
            exc,
        )
        return None
    return SharedArena(mapped_bytes(region, huge=True), path, fd, complete)


def _wait_complete(fd: int, nbytes: int, wait: bool = True) -> bool | None:
    """Wait until no process fills the arena; ``True`` holding it shared if it is complete, else ``False``
    holding it exclusively (this process fills it); ``None`` at once, holding nothing, when ``wait`` is off and
    another process fills it or is about to."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | (0 if wait else fcntl.LOCK_NB))  # waits while a process fills it
        except BlockingIOError:
            return None
        if _is_complete(fd, nbytes):
            return True
        try:
            # Not atomic: another process may take it between the two locks, and is then waited for again.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if not wait:
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None
            time.sleep(0.01)  # another process holds it too and may be about to fill it
            continue
        if _is_complete(fd, nbytes):  # finished between the two locks
            fcntl.flock(fd, fcntl.LOCK_SH)
            return True
        return False


def _is_complete(fd: int, nbytes: int) -> bool:
    if os.fstat(fd).st_size != nbytes + _TRAILER:
        return False
    return os.pread(fd, len(_MAGIC), nbytes) == _MAGIC
