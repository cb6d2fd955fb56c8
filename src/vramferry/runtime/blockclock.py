"""Measure the compute time of every block of a DiT during its first calls: the planner's calibration.

The first ``skip`` calls are not measured (first use: lazy initialisation, kernel selection, loads that were not
prefetched); the next ``calls`` are. A block's time runs from a compute-stream event recorded once its weights
are ready (after the streamer's or scheduler's wait) to one recorded after its kernels, so time spent waiting
for copies is not counted. Nothing synchronises on the hot path: events are read when the result is asked for.
"""

from __future__ import annotations

from typing import Any

import torch

from ..planning.calibrate import BlockTimes
from .transfer import Mover


def call_signature(args: tuple, kwargs: dict) -> tuple:
    """The shapes of a call's tensor arguments: calls with the same signature cost the same."""
    shapes: list[Any] = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
    shapes += [(k, tuple(v.shape)) for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor)]
    return tuple(shapes)


class BlockClock:
    """Times each of one DiT's ``n_blocks`` blocks over a window of its calls.

    Args:
        mover: gives the timing markers (CUDA events, or clock readings on the CPU).
        n_blocks: the DiT's blocks, indexed in execution order.
        skip: calls left unmeasured first.
        calls: calls measured after those.
    """

    def __init__(self, mover: Mover, n_blocks: int, *, skip: int = 1, calls: int = 2) -> None:
        self.mover = mover
        self.n_blocks = n_blocks
        self.skip, self.calls = skip, calls
        self.restart()

    def restart(self) -> None:
        """Measure again from the next call (requests of another shape follow)."""
        self.seen_calls = 0
        self.measuring = False
        self._depth = 0  # nested calls of the same DiT count once
        self._signature: tuple | None = None
        self._consistent = True
        self._open: dict[int, object] = {}
        self._pending: list[tuple[int, object, object]] = []
        self._result: BlockTimes | None = None
        self._resolved = False

    @property
    def finished(self) -> bool:
        """The measuring window has passed (the result may still be unreadable: see :meth:`times`)."""
        return self.seen_calls >= self.skip + self.calls and not self.measuring

    def call_started(self, signature: tuple) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        self.seen_calls += 1
        self.measuring = self.skip < self.seen_calls <= self.skip + self.calls
        if self.measuring:
            if self._signature is None:
                self._signature = signature
            elif signature != self._signature:
                self._consistent = False  # calls of different shapes: their times do not describe one shape

    def call_ended(self) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self.measuring = False
            self._open.clear()

    def block_started(self, index: int) -> None:
        if self.measuring:
            self._open[index] = self.mover.marker()

    def block_ended(self, index: int) -> None:
        start = self._open.pop(index, None)
        if start is not None:
            self._pending.append((index, start, self.mover.marker()))

    def times(self, *, block: bool) -> BlockTimes | None:
        """The measured per-block times once the window has passed; ``None`` before, when a block never ran in
        it (skipped by a cache), when its calls had different input shapes, or (``block=False``) while its
        events are still pending. ``block=True`` waits for them (a device synchronisation)."""
        if self._resolved or not self.finished:
            return self._result
        sums = [0.0] * self.n_blocks
        counts = [0] * self.n_blocks
        for index, start, end in self._pending:
            seconds = self.mover.seconds_between(start, end, block=block)
            if seconds is None:
                return None  # not yet complete: nothing is folded until all are
            sums[index] += seconds
            counts[index] += 1
        self._pending.clear()
        self._resolved = True
        if self._consistent and all(counts):
            self._result = BlockTimes(tuple(s / c for s, c in zip(sums, counts, strict=True)), self.calls)
        return self._result
