"""Filling the host store: each tensor's bytes into its slice of an arena, on threads, then the tensor rebound.

Bytes come straight from the checkpoint file where the tensor is a clean memory-mapped view of it
(:mod:`~vramferry.runtime.files`), otherwise from the tensor itself. Work goes in batches of a few hundred MB:
a batch's copies and reads run on all threads; while the next batch runs, its tensors are rebound to their host
copies, which frees the originals held in memory. Host memory so grows by at most two batches beyond the
weights. The batches run back to back across fills too (``then``): the disk never waits while one arena's last
reads land and the next arena is set up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..discovery.leaves import align, leaves, rebuild, view_in
from ..units import format_bytes
from .files import FileMap, FileReader, Region

#: Bytes filled before their tensors are rebound (and the originals freed).
BATCH_BYTES = 256 * 2**20

#: Batches smaller than this are filled on the calling thread.
PARALLEL_BYTES = 8 * 2**20

#: A copy from memory larger than this is split across threads.
COPY_CHUNK = 32 * 2**20


def progress_bar(total: int, wanted: bool | None, desc: str = "packing weights") -> Any:
    """A tqdm bar over ``total`` bytes (its rate reads in GB/s), or ``None``.

    Args:
        wanted: ``True`` shows it, ``False`` never; ``None`` shows it when vramferry logs at INFO level.
    """
    if wanted is None:
        wanted = logging.getLogger("vramferry").isEnabledFor(logging.INFO)
    if not wanted or total <= 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000)


def default_threads() -> int:
    """Threads for filling: enough outstanding reads for an NVMe drive, at least one per core for copies."""
    return max(4, min(16, os.cpu_count() or 1))


class Filler:
    """Fills pieces of the host store and counts what it moved; one per handle, shared by its arenas.

    Args:
        files: the process's file mappings (``None``: this process's, read when first needed;
            ``FileMap([])``: never read from files).
        progress: called with the bytes filled as they land (a progress bar's ``update``).
        threads: threads for reads and copies.
        bind: rebind each tensor to its host copy once it is filled (the host store); ``False`` only copies the
            bytes, leaving the tensors as they are (``vramferry compress`` reads them to compress them).
    """

    def __init__(
        self,
        files: FileMap | None = None,
        progress: Callable[[int], Any] | None = None,
        threads: int | None = None,
        *,
        bind: bool = True,
    ) -> None:
        self.files = files if files is not None else FileMap.current()
        self.progress = progress
        self.threads = threads or default_threads()
        self.bind = bind
        self._pool: ThreadPoolExecutor | None = None
        self._reader = FileReader()
        self.file_bytes = 0  # read from checkpoint files
        self.copied_bytes = 0  # copied from tensors in memory
        self.seconds = 0.0
        # The batch in flight: its tensors, its jobs, and what to call once it is done.
        self._running: tuple[list, list[Future | int], Callable[[], None] | None] | None = None

    def fill(self, pieces: list, then: Callable[[], None] | None = None) -> None:
        """Copy every tensor of ``pieces`` (each with its ``host`` slice set) into its slice, in layout order,
        and rebind it there (unless ``bind`` is off).

        Args:
            then: with it, the fill returns while its last batch is still in flight, and ``then()`` is called
                once every byte of ``pieces`` has landed (and its tensors are rebound): when the next fill's first
                batch has started, or at :meth:`drain`. Without it, everything has landed on return.
        """
        batch: list = []
        size = 0
        with self._timed():
            for piece in pieces:
                inner = 0
                for ref in piece.refs:
                    batch.append((ref, view_in(piece.host[inner : inner + ref.nbytes])))
                    inner = align(inner + ref.nbytes)
                    size += ref.nbytes
                    if size >= BATCH_BYTES:
                        self._run(batch, size)
                        batch, size = [], 0
            self._run(batch, size, then)
            if then is None:
                self._finish()

    def drain(self) -> None:
        """Wait for the batch still in flight (a fill given ``then``) and run its ``then``."""
        with self._timed():
            self._finish()

    @contextlib.contextmanager
    def _timed(self):
        """Count the time within as filling; after a failure, wait for the jobs in flight and rebind nothing."""
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self._abandon()
            raise
        finally:
            self.seconds += time.perf_counter() - start

    def close(self) -> None:
        """Stop the threads and close the files (a batch still in flight is waited for, its ``then`` not run)."""
        self._abandon()
        self._reader.close()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _run(self, batch: list, size: int, then: Callable[[], None] | None = None) -> None:
        """Start ``batch``'s reads and copies, then finish the batch before it while they run."""
        # Small batches run on this thread: handing a few MB to threads costs more than it saves.
        pool = self.pool() if size >= PARALLEL_BYTES else None
        reads: list[tuple[Region, torch.Tensor]] = []
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for ref, view in batch:
            for tensor, leaf in leaves(ref.current(), ref.layout):
                target = view(leaf)
                region = self.files.region(tensor)
                if region is not None and region.nbytes == leaf.nbytes:
                    reads.append((region, target.view(-1).view(torch.uint8)))
                else:
                    copies.extend(_copy_jobs(target, tensor) if pool is not None else [(target, tensor)])
        jobs: list[Future | int] = []
        if reads:
            jobs.extend(self._reader.start(reads, pool))
            self.file_bytes += sum(region.nbytes for region, _target in reads)
        for target, source in copies:
            jobs.append(pool.submit(_copy, target, source) if pool is not None else _copy(target, source))
            self.copied_bytes += target.numel() * target.element_size()
        self._finish()
        self._running = (batch, jobs, then)

    def _finish(self) -> None:
        """Wait for the batch in flight, then rebind its tensors to their host copies and run its ``then``."""
        if self._running is None:
            return
        batch, jobs, then = self._running
        self._running = None
        for job in jobs:
            self._done(job.result() if isinstance(job, Future) else job)
        for ref, view in batch if self.bind else ():
            # Rebound once filled: the original (in memory, or a view of the mapped file) is released here.
            ref.host = rebuild(ref.layout, view)
            ref.bind(ref.host)
        if then is not None:
            then()

    def _abandon(self) -> None:
        """After a failure: wait for the jobs in flight (they write into the arena), rebinding nothing."""
        if self._running is not None:
            for job in self._running[1]:
                if isinstance(job, Future):
                    job.exception()
            self._running = None

    def pool(self) -> ThreadPoolExecutor:
        """The filler's threads (started on first use, stopped by :meth:`close`); also for checksums and
        digests of what it read."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="vramferry-fill")
        return self._pool

    def _done(self, nbytes: int) -> None:
        if self.progress is not None:
            self.progress(nbytes)

    def summary(self) -> str:
        """One line: bytes filled, time, rate, and how much came from files."""
        total = self.file_bytes + self.copied_bytes
        rate = total / self.seconds / 1e9 if self.seconds > 0 else 0.0
        return (
            f"{format_bytes(total)} in {self.seconds:.2f} s ({rate:.2f} GB/s; {format_bytes(self.file_bytes)} "
            f"read from files, {format_bytes(self.copied_bytes)} copied from memory)"
        )


def _copy_jobs(target: torch.Tensor, source: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One copy, or slices of it for several threads when it is large and both sides are plain bytes."""
    nbytes = target.numel() * target.element_size()
    if nbytes <= COPY_CHUNK or not source.is_contiguous() or source.dtype != target.dtype:
        return [(target, source)]
    flat_target = target.view(-1).view(torch.uint8)
    flat_source = source.detach().reshape(-1).view(torch.uint8)
    return [
        (flat_target[lo : lo + COPY_CHUNK], flat_source[lo : lo + COPY_CHUNK])
        for lo in range(0, nbytes, COPY_CHUNK)
    ]


def _copy(target: torch.Tensor, source: torch.Tensor) -> int:
    with torch.no_grad():
        target.copy_(source)
    return target.numel() * target.element_size()
