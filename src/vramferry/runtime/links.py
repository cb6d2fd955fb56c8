"""Helper GPUs' links: a streamed unit's bytes split across the execution device's own PCIe link and those of
helper GPUs, each helper copying its slice over its own link, then handing it to the execution device peer to peer.

For one unit copied into a slot (``[0, n)`` of its layout split into consecutive slices, one per link, in
proportion to each link's bandwidth):

- the execution device's slice is copied on its copy stream, as without helpers;
- helper ``i`` copies its slice from the (portable, page-locked) host store into a staging buffer of its own on
  its own stream, then copies the staging buffer into the slot. Both copies run on the helper's stream (PyTorch
  runs a peer copy on the source device's current stream), with the execution device's *peer stream* for that
  helper as the destination's current stream: the peer copy waits only for earlier peer copies, never for the
  execution device's other work, and the next slice refills the staging buffer only after the peer copy read it;
- the copy stream waits for each helper's event after its own slice, so the unit's ``ready`` event covers every
  slice.

Everything is ordered with events; the host never waits. Units that decode (compressed) or load in stages (a
swapped DiT's) take the execution device's link alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..discovery.leaves import ALIGN
from .pieces import Unit


def split_ranges(nbytes: int, shares: Sequence[float], align: int = ALIGN) -> list[tuple[int, int]]:
    """``[0, nbytes)`` cut into one consecutive range per share (in order), each in proportion to its share, cut
    points on ``align`` bytes; a zero share gets an empty range. The ranges cover every byte exactly once."""
    if not shares or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError(f"shares: need at least one positive share, got {list(shares)!r}")
    total = float(sum(shares))
    ranges, begin, running = [], 0, 0.0
    for at, share in enumerate(shares):
        running += share
        end = nbytes if at == len(shares) - 1 else min(nbytes, round(nbytes * running / total / align) * align)
        end = max(end, begin)
        ranges.append((begin, end))
        begin = end
    return ranges


@dataclass
class _Helper:
    device: torch.device
    stream: object  # on the helper
    peer_stream: object  # on the execution device: the destination's current stream for the peer copies
    staging: torch.Tensor | None = None


class Links:
    """The execution device's link and its helpers' (:attr:`~vramferry.config.OffloadConfig.helper_devices`).

    Args:
        device: the execution device.
        helpers: the helper GPUs.
        shares: the share of a unit's bytes each link carries: the execution device's first, then each helper's
            (proportional to their measured bandwidths).
    """

    def __init__(self, device: torch.device, helpers: Sequence[torch.device], shares: Sequence[float]) -> None:
        if len(shares) != len(helpers) + 1:
            raise ValueError(f"shares: one per link ({len(helpers) + 1}), got {len(shares)}")
        self.device = device
        self.shares = tuple(float(s) for s in shares)
        self.helpers = [
            _Helper(torch.device(h), torch.cuda.Stream(torch.device(h)), torch.cuda.Stream(device)) for h in helpers
        ]
        self.bytes_by_link = [0] * len(shares)

    def copy(self, unit: Unit, buffer: torch.Tensor, after: object | None) -> list:
        """Issue the helpers' slices of ``unit`` into ``buffer`` and the execution device's own slice on the
        current stream (the copy stream), after ``after`` (the slot is free); returns the helpers' events, which
        the copy stream must wait for before the unit is ready."""
        ranges = split_ranges(unit.nbytes, self.shares)
        events = []
        for at, (helper, (lo, hi)) in enumerate(zip(self.helpers, ranges[1:], strict=True), start=1):
            if hi <= lo:
                continue
            events.append(self._copy_slice(helper, unit, buffer, lo, hi, after))
            self.bytes_by_link[at] += hi - lo
        lo, hi = ranges[0]
        if hi > lo:
            unit.copy_into(buffer, lo, hi, non_blocking=True)
            self.bytes_by_link[0] += hi - lo
        return events

    def _copy_slice(self, helper: _Helper, unit: Unit, buffer: torch.Tensor, lo: int, hi: int, after) -> object:
        size = hi - lo
        if helper.staging is None or helper.staging.numel() < size:
            # Grown on the helper's own stream: earlier peer copies read the old buffer first.
            with torch.cuda.device(helper.device):
                if helper.staging is not None:
                    helper.staging.record_stream(helper.stream)
                helper.staging = torch.empty(size, dtype=torch.uint8, device=helper.device)
        with torch.cuda.stream(helper.stream), torch.cuda.stream(helper.peer_stream):
            if after is not None:
                # The slot is overwritten only once the execution device is done with its previous occupant.
                helper.stream.wait_event(after)
            staged = helper.staging[:size]
            unit.copy_into(staged, lo, hi, base=lo, non_blocking=True)
            # A peer copy: on the source's (the helper's) stream, ordered against the peer stream only.
            buffer[lo:hi].copy_(staged, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record(helper.peer_stream)
        return landed


def link_shares(main_bytes_per_s: float, helpers: Sequence[tuple[bool, float]]) -> tuple[float, ...]:
    """Each link's share of a unit's bytes: the execution device's bandwidth, then each helper's effective one
    (``(distinct device, bytes per second)``; a helper that is the execution device itself adds no link and gets
    an equal share, so that its path still runs)."""
    shares = [main_bytes_per_s]
    for distinct, rate in helpers:
        shares.append(rate if distinct else main_bytes_per_s)
    return tuple(shares)
