"""Measure the device the planner plans for: host→device bandwidth, and the compute time of each DiT block.

Bandwidth is probed once per device. Block times are measured by the runtime during a pipeline's first DiT
calls (CUDA events around every block, see :class:`~vramferry.runtime.blockclock.BlockClock`) and kept here per device,
component and request shape. A plan for a shape that was measured uses the measured times; a plan for another
shape scales the nearest measurement by the cost model's ratio between the two shapes, so one measured request
corrects the model for every shape on that device.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..discovery.inventory import ComponentSize, Inventory
    from .devices import DeviceProfile
    from .workload import Workload


@dataclass(frozen=True)
class BlockTimes:
    """Measured compute seconds of each block of one DiT in one call, in execution order.

    Attributes:
        seconds: per block, the mean over the measured calls.
        calls: how many DiT calls were measured.
    """

    seconds: tuple[float, ...]
    calls: int


# (device name, component key, shape key) -> BlockTimes. Per process: a new process measures again, during
# its first request, at no extra cost.
_MEASURED: dict[tuple, BlockTimes] = {}


def _component_key(size: ComponentSize) -> tuple:
    return (size.name, size.bytes, size.block_bytes)


def shape_key(workload: Workload) -> tuple:
    """What a DiT call's cost depends on: output size, frames, batch and prompt tokens (not steps or CFG)."""
    return (workload.height, workload.width, workload.num_frames, workload.batch, workload.text_tokens)


def record_block_times(device_name: str, size: ComponentSize, workload: Workload, times: BlockTimes) -> None:
    """Keep ``times``, measured on ``device_name`` for the DiT ``size`` running requests shaped like ``workload``."""
    if len(times.seconds) != len(size.block_bytes):
        raise ValueError(f"{size.name}: {len(times.seconds)} block times for {len(size.block_bytes)} blocks")
    _MEASURED[(device_name, _component_key(size), shape_key(workload))] = times


def forget_block_times() -> None:
    """Drop every measurement (tests; or after changing clocks or drivers)."""
    _MEASURED.clear()


def _shaped(workload: Workload, key: tuple) -> Workload:
    """``workload`` with the request shape ``key`` (see :func:`shape_key`)."""
    height, width, frames, batch, text = key
    return dataclasses.replace(
        workload, height=height, width=width, num_frames=frames, batch=batch, text_tokens=text
    )


def _tokens(size: ComponentSize, work: Workload) -> float:
    from .costmodel import dit_shape_of

    return work.sequence_of(dit_shape_of(size)) * work.batch


def measured_block_times(
    device_name: str, size: ComponentSize, workload: Workload, device: DeviceProfile
) -> tuple[tuple[float, ...], str] | None:
    """Block times for ``size`` under ``workload`` from this device's measurements, and where they came from.

    Returns the measured times for this very shape, else those of the measured shape nearest in tokens per
    call, each block scaled by the cost model's estimate for ``workload`` over its estimate for the measured
    shape; ``None`` when this DiT was never measured on this device.
    """
    from .costmodel import estimated_block_times

    component = _component_key(size)
    found = {k[2]: v for k, v in _MEASURED.items() if k[0] == device_name and k[1] == component}
    if not found:
        return None
    wanted = shape_key(workload)
    if wanted in found:
        return found[wanted].seconds, "measured"
    target = _tokens(size, workload)
    key = min(found, key=lambda k: abs(math.log(_tokens(size, _shaped(workload, k)) / target)))
    height, width, frames = key[:3]
    then = estimated_block_times(size, _shaped(workload, key), device)
    now = estimated_block_times(size, workload, device)
    scaled = tuple(m * n / t if t > 0 else m for m, n, t in zip(found[key].seconds, now, then, strict=True))
    return scaled, f"scaled from the measurement at {width}×{height}" + (f"×{frames}" if frames > 1 else "")


def with_measured_times(
    workload: Workload, inventory: Inventory, device_name: str, device: DeviceProfile
) -> tuple[Workload, dict[str, str]]:
    """``workload`` with ``block_compute_s`` filled from this device's measurements where the caller gave none,
    and per DiT where its times came from."""
    times = dict(workload.block_compute_s)
    sources: dict[str, str] = {}
    for size in inventory.components:
        if size.role != "dit" or not size.block_bytes or size.name in times:
            continue
        found = measured_block_times(device_name, size, workload, device)
        if found is not None:
            times[size.name], sources[size.name] = found
    if not sources:
        return workload, sources
    return dataclasses.replace(workload, block_compute_s=times), sources
