"""Host→device copies on a dedicated stream, ordered with events; no host synchronisation on the hot path.

On a CPU execution device the same calls run synchronously with plain copies, so the whole hook machinery is
exercised by CPU tests.

A unit with encoded pieces (:mod:`~vramferry.runtime.codecs`) loads in two stages per chunk of a piece: its
compressed bytes are copied into one of two device staging buffers on the copy stream, then decoded into the unit's
device copy on a decode stream of their own. Events order the three streams, so while chunk ``k`` decodes, chunk
``k + 1`` is already crossing the link and the compute stream runs the block before; the host never waits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .codecs import Encoded
from .links import Links
from .pieces import Unit


@dataclass
class TransferCounters:
    bytes_h2d: int = 0
    bytes_d2h: int = 0
    swaps: int = 0
    blocks_streamed: int = 0
    sync_loads: int = 0
    unplanned_phases: int = 0
    bytes_decoded: int = 0  # raw bytes that encoded pieces decoded to
    repacked_bytes: int = 0  # raw bytes of pieces packed again after their tensors changed
    repacked_pieces: int = 0
    copy_seconds: float = 0.0
    wait_seconds: float = 0.0
    # (start, end) CUDA events of copies not yet folded into copy_seconds
    pending_copies: list = field(default_factory=list)
    # (before, after) compute-stream events around waits on copies
    pending_waits: list = field(default_factory=list)
    dit_calls: int = 0
    dit_seconds: float = 0.0
    # (start, end) compute-stream events around DiT forwards
    pending_calls: list = field(default_factory=list)


class Mover:
    """Issues unit copies to ``device`` and makes the compute stream wait for them.

    Args:
        device: the execution device.
        timing: record CUDA events around copies and waits so ``stats()`` can report GB/s and stall time.
        links: helper GPUs' links (:class:`~vramferry.runtime.links.Links`): copies into slots are split across
            them.
    """

    def __init__(self, device: torch.device, *, timing: bool = True, links: Links | None = None) -> None:
        self.device = device
        self.links = links  # helper GPUs' links, for copies into slots (streamed blocks)
        self.cuda = device.type == "cuda"
        self.timing = timing and self.cuda
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.counters = TransferCounters()
        self._decode_stream = None
        self._staging: list[_Staging] = [_Staging(), _Staging()]
        self._turn = 0

    def compute_stream(self):
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def onload_async(
        self,
        unit: Unit,
        slot: torch.Tensor | None = None,
        after: object | None = None,
        *,
        exact: bool = False,
    ) -> None:
        """Start copying ``unit`` to the device and bind its tensors to the device copy.

        The tensors are rebound at once; kernels that use them must first ``wait_ready(unit)``.

        Args:
            slot: a preallocated device buffer to copy into (layerwise); else one is allocated.
            after: a compute-stream event the copy must wait for (the slot's previous occupant finished).
            exact: allocate exactly the unit's bytes (a resident piece, dropped only when the plan changes)
                rather than whole allocator segments (a swapped part, dropped every request).
        """
        if not self.cuda:
            t0 = time.perf_counter()
            buffer = slot if slot is not None else device_bytes(unit.nbytes, self.device)
            unit.copy_into(buffer)
            self.counters.copy_seconds += time.perf_counter() - t0
            self._finish(unit, buffer)
            return
        if slot is None:
            # Allocated from the compute stream's pool, so that once dropped its memory serves activations
            # too (a copy-stream pool would sit beside it and inflate reserved memory). No record_stream: the
            # compute stream waits for the copy before the buffer is used or dropped (wait_ready, drop), so
            # the allocator may reuse the memory the moment it is freed. With record_stream the freed block
            # stays pending until the allocator polls the copy's event, and an allocation made just after an
            # eviction (the next component's) can miss it and reserve a second segment beside it.
            # Rounded up to the allocator's 2 MiB segment granularity, so that a fresh segment holds this
            # buffer exactly: no remainder in which a small, long-lived activation could settle and keep the
            # whole segment reserved after the unit is dropped.
            size = unit.nbytes if exact else _segment_size(unit.nbytes)
            buffer = device_bytes(size, self.device)
            # The buffer may reuse memory the compute stream just released: copy only after that work.
            self.copy_stream.wait_stream(self.compute_stream())
        else:
            buffer = slot
        encoded = unit.encoded
        staged = slot is None and bool(unit.stages) and not encoded
        if encoded:
            self._reserve_staging(unit)
            if slot is None:
                # The decodes write into the new buffer, which may reuse memory the compute stream just released.
                self.decode_stream.wait_stream(self.compute_stream())
        with torch.cuda.stream(self.copy_stream):
            if after is not None and not encoded:
                # The slot is overwritten only once the compute stream is done with its previous occupant (an
                # encoded unit's copies land in staging buffers: only its decodes wait, in _copy_encoded).
                self.copy_stream.wait_event(after)
            start = torch.cuda.Event(enable_timing=True) if self.timing else None
            if start is not None:
                start.record(self.copy_stream)
            if encoded:
                ready = self._copy_encoded(unit, buffer, after)
            elif staged:
                ready = self._copy_staged(unit, buffer)
            elif self.links is not None and slot is not None:
                # Slices over the helpers' links too; the unit is ready once every slice has landed.
                for landed in self.links.copy(unit, buffer, after):
                    self.copy_stream.wait_event(landed)
                ready = torch.cuda.Event(enable_timing=self.timing)
                ready.record(self.copy_stream)
            else:
                unit.copy_into(buffer, non_blocking=True)
                ready = torch.cuda.Event(enable_timing=self.timing)
                ready.record(self.copy_stream)
        if start is not None:
            self.counters.pending_copies.append((start, ready))
            self._fold_if_long()
        unit.ready_event = ready
        self._finish(unit, buffer)

    def _copy_staged(self, unit: Unit, buffer: torch.Tensor) -> object:
        """Copy the head, then each stage, with an event after each (on the copy stream); the last is returned.
        The copies run back to back at the link's rate; the events let each block start once its bytes landed.
        """
        begin = unit.head_bytes
        if begin:  # none when the DiT's non-block part is resident and only blocks are swapped
            unit.copy_into(buffer, 0, begin, non_blocking=True)
        unit.head_event = torch.cuda.Event()
        unit.head_event.record(self.copy_stream)
        event = unit.head_event
        for end, blocks in unit.stages:
            unit.copy_into(buffer, begin, end, non_blocking=True)
            event = torch.cuda.Event(enable_timing=self.timing)
            event.record(self.copy_stream)
            unit.stage_events.update((id(block), event) for block in blocks)
            begin = end
        return event

    def _reserve_staging(self, unit: Unit) -> None:
        """Grow the two staging buffers to hold ``unit``'s largest compressed chunk (allocated from the compute
        stream's pool, before the copy stream uses them)."""
        need = max(h.largest_chunk for h, _s in unit.runs if isinstance(h, Encoded))
        for stage in self._staging:
            if stage.buffer is None or stage.buffer.numel() < need:
                if stage.buffer is not None:
                    # The old buffer may still be read by queued copies and decodes: keep its memory from the
                    # allocator until both streams have passed this point.
                    stage.buffer.record_stream(self.copy_stream)
                    stage.buffer.record_stream(self.decode_stream)
                stage.buffer = device_bytes(_segment_size(need), self.device)
                stage.free = self.record_done()

    @property
    def decode_stream(self):
        if self._decode_stream is None:
            # The highest priority: a decode queued behind the compute stream's kernels would wait for SMs, and
            # with two staging buffers the link stalls until it has run; a few short decodes first cost the
            # compute stream less than an idle link does.
            self._decode_stream = torch.cuda.Stream(self.device, priority=-1)  # lower numbers run first
        return self._decode_stream

    def _copy_encoded(self, unit: Unit, buffer: torch.Tensor, after: object | None) -> object:
        """Issue the loads of a unit with encoded pieces (see the module docstring); returns the event after which
        the whole device copy is ready, recorded on the decode stream."""
        decode = self.decode_stream
        if after is not None:
            # The decodes write into the slot: only once its previous occupant has finished.
            decode.wait_event(after)
            if not all(isinstance(host, Encoded) for host, _start in unit.runs):
                self.copy_stream.wait_event(after)  # and so do the copies of its raw pieces
        for host, start in unit.runs:
            if not isinstance(host, Encoded):
                buffer[start : start + host.numel()].copy_(host, non_blocking=True)
                continue
            for chunk in host.chunks:
                stage = self._staging[self._turn]
                self._turn = 1 - self._turn
                if stage.free is not None:
                    # The staging buffer is refilled only once the decode that read it has run.
                    self.copy_stream.wait_event(stage.free)
                staged = stage.buffer[: chunk.length]
                staged.copy_(host.payload[chunk.start : chunk.start + chunk.length], non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.copy_stream)
                decode.wait_event(copied)  # decode only what has landed
                at = start + chunk.raw_start
                stage.keep = host.codec.decode_on(staged, buffer[at : at + chunk.raw_len], decode)
                stage.free = torch.cuda.Event()
                stage.free.record(decode)
            self.counters.bytes_decoded += host.nbytes
        landed = torch.cuda.Event()
        landed.record(self.copy_stream)
        decode.wait_event(landed)  # the raw pieces' copies too
        ready = torch.cuda.Event(enable_timing=self.timing)
        ready.record(decode)
        return ready

    def _finish(self, unit: Unit, buffer: torch.Tensor) -> None:
        unit.device_buffer = buffer
        unit.bind_buffer(buffer)
        unit.on_device = True
        if unit.encoded:
            self.counters.bytes_h2d += unit.host_bytes
            if not self.cuda:
                self.counters.bytes_decoded += sum(h.nbytes for h, _s in unit.runs if isinstance(h, Encoded))
        else:
            self.counters.bytes_h2d += unit.nbytes

    def wait_ready(self, unit: Unit) -> None:
        """Make the compute stream wait (on the GPU, not the host) until ``unit``'s copy has landed."""
        event = unit.ready_event
        unit.head_event = None
        unit.stage_events.clear()
        if event is None:
            return
        unit.ready_event = None
        self._wait(event)

    def wait_head(self, unit: Unit) -> None:
        """Like :meth:`wait_ready`, but for a staged copy only until the part outside the blocks has landed;
        each block then waits for its own stage (:meth:`wait_stage`)."""
        if not unit.stage_events:
            self.wait_ready(unit)
            return
        if unit.head_event is not None:
            self._wait(unit.head_event)
            unit.head_event = None

    def wait_stage(self, unit: Unit, block: object) -> None:
        """Before ``block`` runs: make the compute stream wait until its stage of ``unit``'s copy has landed."""
        event = unit.stage_events.pop(id(block), None)
        if event is None:
            return
        self._wait(event)
        if not unit.stage_events:
            unit.ready_event = None  # every stage waited for, the last one included

    def _wait(self, event: object) -> None:
        compute = self.compute_stream()
        if self.timing:
            before = torch.cuda.Event(enable_timing=True)
            after = torch.cuda.Event(enable_timing=True)
            before.record(compute)
            compute.wait_event(event)
            after.record(compute)
            self.counters.pending_waits.append((before, after))
            self._fold_if_long()
        else:
            compute.wait_event(event)

    def drop(self, unit: Unit) -> None:
        """Point the unit back at its host copy; the device copy is released (zero bytes move)."""
        if unit.ready_event is not None and self.cuda:
            # Loaded but never waited for (a prefetch evicted unused): order the copy before whatever the
            # compute stream does next with the freed memory. A GPU-side wait, not a host one.
            self.compute_stream().wait_event(unit.ready_event)
        unit.bind_host()
        unit.device_buffer = None
        unit.ready_event = None
        unit.head_event = None
        unit.stage_events.clear()

    def trim_cache(self, threshold: int = 512 * 2**20) -> None:
        """Return cached free memory to the device when more than ``threshold`` bytes sit unused.

        At a phase change (threshold 512 MiB): memory cached for the last phase's activations goes back, so the
        next phase's differently shaped ones reuse it instead of growing reserved memory beside it. After an
        eviction, before the next component allocates (threshold 0): left cached, an evicted component's segment
        is carved up by whatever allocates next (the next component's smaller weights, then small activations
        that live through the request, such as prompt embeddings); one such small tensor keeps the whole segment
        reserved, and the next swap of the large component needs a second segment beside it (measured: 47.8 GB
        reserved for 24.5 GB allocated in model mode on a FLUX.1-sized pipeline). ``empty_cache`` synchronises
        the device: called at component switches and phase changes only, never per block.
        """
        if not self.cuda:
            return
        if torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device) > threshold:
            torch.cuda.empty_cache()

    def record_done(self) -> object | None:
        """An event on the compute stream marking that work issued so far is done (to guard slot reuse)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.compute_stream())
        return event

    def _fold_if_long(self) -> None:
        # Keep the pending lists short without synchronising: fold only events that have completed.
        c = self.counters
        if len(c.pending_copies) + len(c.pending_waits) + len(c.pending_calls) > 1024:
            self.fold(block=False)

    def fold(self, *, block: bool) -> None:
        """Turn completed timing events into seconds. ``block=True`` synchronises first (stats only)."""
        if not self.cuda:
            return
        if block:
            torch.cuda.synchronize(self.device)  # stats() only: the caller asked for exact numbers now
        c = self.counters
        c.pending_copies, seconds = _elapsed(c.pending_copies, block)
        c.copy_seconds += seconds
        c.pending_waits, seconds = _elapsed(c.pending_waits, block)
        c.wait_seconds += seconds
        c.pending_calls, seconds = _elapsed(c.pending_calls, block)
        c.dit_seconds += seconds

    def marker(self) -> object:
        """A point in the compute stream's work: a timing event recorded now, or a clock reading on the CPU."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.compute_stream())
        return event

    def seconds_between(self, start: object, end: object, *, block: bool) -> float | None:
        """Seconds between two :meth:`marker` results; ``None`` if ``end`` has not completed and not ``block``."""
        if not self.cuda:
            return end - start  # type: ignore[operator]
        return _event_seconds(start, end, block)

    def call_ended(self, start: object) -> None:
        """Count a DiT forward that began at ``start``; its GPU time is read later (no synchronisation now)."""
        c = self.counters
        c.dit_calls += 1
        if not self.cuda:
            c.dit_seconds += time.perf_counter() - start
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.compute_stream())
        c.pending_calls.append((start, end))
        self._fold_if_long()

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


@dataclass(eq=False)
class _Staging:
    """A device buffer that compressed bytes land in before they are decoded."""

    buffer: torch.Tensor | None = None
    free: object | None = None  # decode-stream event: the last decode that read it has run
    keep: object | None = None  # the codec's output of that decode, alive until the buffer is refilled


def device_bytes(nbytes: int, device: torch.device) -> torch.Tensor:
    """``nbytes`` of uninitialised device memory, never an inference tensor: weights are bound to views of it,
    and a parameter bound to an inference tensor can never take ``requires_grad`` again."""
    with torch.inference_mode(False):
        return torch.empty(nbytes, dtype=torch.uint8, device=device)


_SEGMENT = 2 * 2**20  # the CUDA caching allocator's rounding of large segments


def _segment_size(nbytes: int) -> int:
    return -(-nbytes // _SEGMENT) * _SEGMENT


def _event_seconds(start, end, block: bool) -> float | None:
    """Seconds between two CUDA events; ``None`` if ``end`` has not completed and not ``block``."""
    if not block and not end.query():
        return None
    if block:
        end.synchronize()  # only when the caller asked to block (stats, replan)
    return start.elapsed_time(end) / 1e3


def _elapsed(pairs: list, block: bool) -> tuple[list, float]:
    """``(still pending, seconds)`` for ``(start, end)`` event pairs; ``block``: all have completed."""
    pending, total = [], 0.0
    for start, end in pairs:
        seconds = _event_seconds(start, end, block)
        if seconds is None:
            pending.append((start, end))
        else:
            total += seconds
    return pending, total
