"""Layerwise offload: a DiT's blocks streamed through fixed device slots, ahead of the block that runs.

At most ``depth + 1`` slots exist at a time. Before block ``i`` runs, blocks ``i+1 … i+depth`` (wrapping into
the next step or CFG branch) are already being copied on the copy stream; when block ``i`` ends, its slot is
handed to block ``i+depth+1``. Slots are sized exactly to their blocks and reused block after block; when the
block size changes (Flux's double-stream blocks, then its smaller single-stream blocks), free slots of the old
size are released first, so device memory never holds more than ``depth + 1`` blocks of the current kind. Ordering is done with events only:
the compute stream waits for a block's copy, and the copy stream waits for the slot's previous occupant to
finish. A block that runs out of the expected order, or after skipped blocks, is loaded on demand (counted as a
``sync_load``), and the ring restarts from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .pieces import Unit
from .transfer import Mover, device_bytes

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Slot:
    buffer: torch.Tensor
    unit: Unit | None = None
    running: bool = False
    free_event: object | None = None  # compute-stream event: the previous occupant has finished
    copied: object | None = None  # copy-stream event: the last copy into this slot has landed


class BlockStreamer:
    """Streams ``units`` (one per block, in execution order) through ``depth + 1`` device slots."""

    def __init__(
        self, mover: Mover, name: str, units: list[Unit], depth: int, *, uniform: bool = False
    ) -> None:
        if not units:
            raise ValueError(f"{name}: no blocks to stream")
        self.mover = mover
        self.name = name
        self.units = units
        self.index = {id(u): i for i, u in enumerate(units)}
        self.depth = max(1, min(depth, len(units) - 1)) if len(units) > 1 else 0
        self.slot_size = max(u.nbytes for u in units)
        # uniform: every slot has the largest block's size and is kept while streaming. Allocated memory is
        # then (depth + 1) x the largest block throughout, but the allocator never has to find room for a
        # block of the other size between activations, so reserved memory stays flat (used under a budget).
        self.uniform = uniform
        self.slots: list[Slot] = []
        self.streaming = False

    @property
    def slot_bytes(self) -> int:
        """The most device memory the slots can take (for budgets)."""
        return self.slot_size * (self.depth + 1)

    @property
    def active(self) -> bool:
        return self.streaming

    def start(self) -> None:
        """Start copying the first blocks."""
        if self.streaming:
            return
        self.streaming = True
        for i in range(self.depth + 1):
            self._load(i)

    def stop(self) -> None:
        """Release the slots; every block points back at its host copy."""
        for slot in self.slots:
            if slot.unit is not None:
                self.mover.drop(slot.unit)
                slot.unit.slot = None
        self.slots = []
        self.streaming = False

    def clear_running(self) -> None:
        """Mark every slot idle: a block interrupted by a ``BaseException`` never reached :meth:`after_block`."""
        for slot in self.slots:
            slot.running = False

    # -- hooks --------------------------------------------------------------------------------------------
    def before_block(self, unit: Unit) -> None:
        """Called before a block runs: make it ready and keep the ring full."""
        if not self.streaming:
            self.start()
        i = self.index[id(unit)]
        wanted = {(i + k) % len(self.units) for k in range(self.depth + 1)}
        if unit.slot is None:
            # Not prefetched: out of order, after skipped blocks, or the first use. Free the slots that
            # hold blocks no longer expected soon, then load this one now.
            self._release_unwanted(wanted)
            self.mover.counters.sync_loads += 1
            self._load(i, force=True)
        self.mover.wait_ready(unit)
        if unit.slot is not None:
            unit.slot.running = True
        for k in range(1, self.depth + 1):
            self._load((i + k) % len(self.units))

    def after_block(self, unit: Unit) -> None:
        """Called after a block ran (also when it raised): free its slot and refill the ring."""
        slot = unit.slot
        if slot is None:
            if unit.on_device:  # loaded into a temporary buffer because every slot was busy
                self.mover.drop(unit)
            return
        slot.running = False
        slot.free_event = self.mover.record_done()
        self.mover.drop(unit)
        unit.slot = None
        slot.unit = None
        # No local reference may outlive this point: if the next block needs a slot of another size, this
        # one is released, and its memory must be free before the new one is allocated.
        del slot
        i = self.index[id(unit)]
        self._load((i + self.depth + 1) % len(self.units))

    # -- internals ----------------------------------------------------------------------------------------
    def _release_unwanted(self, wanted: set[int]) -> None:
        for slot in self.slots:
            if slot.unit is not None and not slot.running and self.index[id(slot.unit)] not in wanted:
                # Never ran, so no compute used the slot; later copies on the copy stream are ordered after
                # the one that filled it.
                self.mover.drop(slot.unit)
                slot.unit.slot = None
                slot.unit = None

    def _load(self, i: int, *, force: bool = False) -> None:
        unit = self.units[i]
        if unit.slot is not None or unit.on_device:
            return
        slot = self._slot_for(unit.nbytes)
        if slot is None:
            if force:  # every slot is busy (a block running inside another): use a temporary buffer
                self.mover.onload_async(unit)
                self.mover.counters.blocks_streamed += 1
            return
        slot.unit = unit
        unit.slot = slot
        self.mover.onload_async(unit, slot=slot.buffer, after=slot.free_event)
        slot.copied = unit.ready_event
        self.mover.counters.blocks_streamed += 1

    def _slot_for(self, nbytes: int) -> Slot | None:
        """A free slot of exactly ``nbytes``, else a new one if fewer than ``depth + 1`` are occupied."""
        free = [s for s in self.slots if s.unit is None]
        reusable = next((s for s in free if s.buffer.numel() == nbytes or self.uniform), None)
        if reusable is not None:
            return reusable
        if len(self.slots) - len(free) >= self.depth + 1:
            return None
        # The block size changed: give the free slots of the old size back before allocating (and hold no
        # reference to them, so that their memory is free when the new buffer is allocated).
        while free:
            self._release(free.pop())
        size = self.slot_size if self.uniform else nbytes
        buffer = device_bytes(size, self.mover.device)
        slot = Slot(buffer)
        # The buffer may reuse memory the compute stream used until now: copy into it only after that work.
        slot.free_event = self.mover.record_done()
        self.slots.append(slot)
        return slot

    def _release(self, slot: Slot) -> None:
        """Free a slot's memory at once. No record_stream: the compute stream first waits for the last copy
        into it (a GPU-side wait), so the allocator may hand the memory to the compute stream right away
        instead of counting it as in use until the copy stream's events are polled."""
        if slot.copied is not None:
            self.mover.compute_stream().wait_event(slot.copied)
        self.slots.remove(slot)
