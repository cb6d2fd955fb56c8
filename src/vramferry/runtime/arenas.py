"""Host arenas: page-aligned buffers on transparent huge pages, page-locked in place for copies to the GPU.

Arenas are allocated pageable and then page-locked with ``cudaHostRegister``: exact size, no power-of-two
rounding of the caching host allocator, and ~0.02-0.08 s/GB instead of ~0.7 s/GB for ``pin_memory()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import mmap
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..units import format_bytes

logger = logging.getLogger(__name__)

#: Back arenas with transparent huge pages (``madvise``). On the H200 machine an 8 GiB arena faults in at
#: 33-37 GB/s on huge pages against 16-22 GB/s on 4 KiB pages, and page-locks in 0.02 s/GB against 0.05-0.08
#: s/GB; copies to the GPU run at the same 55 GB/s from both.
HUGE_PAGES = True

_READ_ONLY = 8  # cudaHostRegisterReadOnly


#: Most bytes of one arena (a piece larger than this has one of its own): each arena is page-locked, and its
#: pieces can be copied to the device, as soon as it is filled, while the next one fills; a component's last
#: arena is all that is left to page-lock once its last byte is read.
ARENA_BYTES = 1 << 30


def arena_chunks(pieces: list) -> list[list]:
    """``pieces`` (the host store's, with ``layout()``) in order, in consecutive runs of at most
    :data:`ARENA_BYTES` (a larger piece alone): one arena each."""
    found: list[list] = []
    size = 0
    for piece in pieces:
        nbytes = piece.layout()
        if not found or size + nbytes > ARENA_BYTES:
            found.append([])
            size = 0
        found[-1].append(piece)
        size += nbytes
    return found


def host_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-aligned host memory (an anonymous mapping), on transparent huge pages with
    :data:`HUGE_PAGES`."""
    try:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, AttributeError):
        return torch.empty(nbytes, dtype=torch.uint8)
    return mapped_bytes(region, huge=HUGE_PAGES)


def mapped_bytes(region: mmap.mmap, *, huge: bool) -> torch.Tensor:
    """A uint8 tensor over all of ``region`` (no copy; it keeps the mapping alive), on transparent huge pages
    where ``huge`` and the kernel allows them for that mapping."""
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer keeps a reference to the region; no copy is made
        return torch.frombuffer(region, dtype=torch.uint8)


class PageLocker:
    """Page-locks host arenas up to a limit, at once or on a background thread; an arena it cannot page-lock
    stays pageable (one warning per store).

    Args:
        pin: page-lock at all (needs CUDA).
        pin_limit: most bytes to page-lock.
        portable: page-lock for every GPU's context (helper GPUs copy from the arenas too).
    """

    def __init__(self, *, pin: bool, pin_limit: int | None = None, portable: bool = False) -> None:
        self.pin = pin and torch.cuda.is_available()
        self.pin_limit = pin_limit
        self._flags = 1 if portable else 0  # cudaHostRegisterPortable
        self.pinned_bytes = 0
        self.seconds = 0.0  # spent page-locking
        self._warned = False
        self._worker: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        # Arenas page-locked and not yet unlocked, by address. Each stays mapped until it is unlocked: should the
        # locker be collected first, the finalizer unlocks what is left before the mappings can go. Memory unmapped
        # while still page-locked leaves a stale registration at its address, and the next arena mapped there
        # could be neither page-locked nor copied from.
        self._locked: dict[int, torch.Tensor] = {}
        weakref.finalize(self, _unlock_all, self._locked).atexit = False

    @contextlib.contextmanager
    def in_background(self):
        """While it lasts, :meth:`lock` page-locks on a background thread, in the order it is called, so that the
        caller fills the next arena meanwhile (page-locking 34 GB takes about a second); on exit every arena
        passed to :meth:`lock` is page-locked or kept pageable, and its callback has run."""
        if not self.pin or self._worker is not None:
            yield
            return
        device = torch.cuda.current_device()  # the worker page-locks for the device this thread would
        self._worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="vramferry-pin", initializer=torch.cuda.set_device, initargs=(device,)
        )
        try:
            yield
        finally:
            worker, pending = self._worker, self._pending
            self._worker, self._pending = None, []
            try:
                for future in pending:
                    future.result()
            finally:
                worker.shutdown(wait=True)

    def lock(
        self, name: str, arena: torch.Tensor, then: Callable[[bool], None], *, read_only: bool = False
    ) -> None:
        """Page-lock ``arena`` (of component ``name``), then call ``then(pinned)``: on the background thread
        while :meth:`in_background` lasts (callbacks run there one at a time, in order), else now.
        ``read_only``: the device only reads it (``cudaHostRegisterReadOnly``), as for a read-only mapping (a
        shared arena's source of copies)."""
        if self._worker is not None:
            self._pending.append(self._worker.submit(lambda: then(self._lock_now(name, arena, read_only))))
        else:
            then(self._lock_now(name, arena, read_only))

    def unlock(self, arena: torch.Tensor) -> None:
        """Undo :meth:`lock` for an arena it page-locked."""
        torch.cuda.cudart().cudaHostUnregister(arena.data_ptr())
        self._locked.pop(arena.data_ptr(), None)
        self.pinned_bytes -= arena.numel()

    def _lock_now(self, name: str, arena: torch.Tensor, read_only: bool = False) -> bool:
        if not self.pin:
            return False
        size = arena.numel()
        if self.pin_limit is not None and self.pinned_bytes + size > self.pin_limit:
            self._warn_pageable(name, f"the host page-lock limit of {format_bytes(self.pin_limit)} is reached")
            return False
        start = time.perf_counter()
        flags = self._flags | (_READ_ONLY if read_only else 0)
        err = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), size, flags)
        self.seconds += time.perf_counter() - start
        if int(err) != 0:
            _clear_last_error()
            self._warn_pageable(name, f"cudaHostRegister failed ({_error_name(err)})")
            return False
        self._locked[arena.data_ptr()] = arena
        self.pinned_bytes += size
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


def _unlock_all(locked: dict[int, torch.Tensor]) -> None:
    for address in list(locked):
        torch.cuda.cudart().cudaHostUnregister(address)
    locked.clear()


def _error_name(err) -> str:
    try:
        return f"error {int(err)}: {torch.cuda.cudart().cudaGetErrorString(err)}"
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return f"error {int(err)}"


def _clear_last_error() -> None:
    """Reset this thread's last CUDA runtime error: a failed ``cudaHostRegister`` leaves it set, and PyTorch would
    raise it at this thread's next kernel launch, far from its cause."""
    function = _get_last_error()
    if function is not None:
        function()


@functools.cache
def _get_last_error():
    """``cudaGetLastError`` of the CUDA runtime library PyTorch loaded, or ``None`` where it cannot be found."""
    paths = []
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        paths = [line.split()[-1] for line in maps if "libcudart" in line]
    for path in [*dict.fromkeys(paths), None]:
        try:
            return ctypes.CDLL(path).cudaGetLastError
        except (OSError, AttributeError):
            continue
    return None
