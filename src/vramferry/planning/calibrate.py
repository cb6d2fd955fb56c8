"""Measure the device the planner plans for: host→device bandwidth, and the compute time of each DiT block.

The bandwidth is probed by the runtime (:func:`~vramferry.runtime.probe.device_profile`) and kept with the block
times.

Block times are measured by the runtime during a pipeline's first DiT calls (CUDA events around every block, see
:class:`~vramferry.runtime.blockclock.BlockClock`) and kept in a :class:`Measurements` per device, component and
request shape: data that the handle owns and hands to the planner, never module state. A plan for a shape
that was measured uses the measured times; a plan for another shape scales the nearest measurement by the cost model's ratio between the two shapes, so one measured request
corrects the model for every shape on that device.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
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


def _component_key(size: ComponentSize) -> tuple:
    return (size.name, size.bytes, size.block_bytes)


def shape_key(workload: Workload) -> tuple:
    """What a DiT call's cost depends on: output size, frames, batch and prompt tokens (not steps or CFG)."""
    return (workload.height, workload.width, workload.num_frames, workload.batch, workload.text_tokens)


def workload_key(workload: Workload) -> tuple:
    """What a plan depends on in a request: its shape (:func:`shape_key`), steps and DiT calls per step."""
    return (*shape_key(workload), workload.steps, workload.cfg)


@dataclass
class Measurements:
    """What was measured on devices, as data the planner takes (``plan(..., measured=...)``): per device name,
    component and request shape, the DiT block times. A handle keeps its own (:attr:`OffloadHandle.measurements
    <vramferry.api.OffloadHandle.measurements>`) and passes it on when it re-plans; pass one to
    ``apply(..., measured=...)`` to start a new handle from what another one measured."""

    block_times: dict[tuple, BlockTimes] = field(default_factory=dict)
    h2d_bytes_per_s: dict[str, float] = field(default_factory=dict)  # device name -> pinned bandwidth
    # (device name, codec name) -> bytes of output decoded per second
    decode_bytes_per_s: dict[tuple[str, str], float] = field(default_factory=dict)

    def record(self, device_name: str, size: ComponentSize, workload: Workload, times: BlockTimes) -> None:
        """Keep ``times``, measured on ``device_name`` for the DiT ``size`` running requests like ``workload``."""
        if len(times.seconds) != len(size.block_bytes):
            raise ValueError(
                f"{size.name}: {len(times.seconds)} block times for {len(size.block_bytes)} blocks"
            )
        self.block_times[(device_name, _component_key(size), shape_key(workload))] = times

    def shapes(self, device_name: str, size: ComponentSize) -> dict[tuple, BlockTimes]:
        """The measured shapes of the DiT ``size`` on ``device_name``, by :func:`shape_key`."""
        component = _component_key(size)
        return {k[2]: v for k, v in self.block_times.items() if k[0] == device_name and k[1] == component}


def _shaped(workload: Workload, key: tuple) -> Workload:
    """``workload`` with the request shape ``key`` (see :func:`shape_key`)."""
    height, width, frames, batch, text = key
    return dataclasses.replace(
        workload, height=height, width=width, num_frames=frames, batch=batch, text_tokens=text
    )


def _tokens(size: ComponentSize, work: Workload) -> float:
    from .costmodel import dit_shape_of

    return work.sequence_of(dit_shape_of(size)) * work.batch


def measurement_basis(
    measured: Measurements, device_name: str, size: ComponentSize, workload: Workload
) -> tuple | None:
    """The measured request shape (:func:`shape_key`) that block times for ``size`` under ``workload`` come
    from: the workload's own when it was measured, else the measured shape nearest in tokens per call; ``None``
    when this DiT was never measured on this device."""
    found = measured.shapes(device_name, size)
    if not found:
        return None
    wanted = shape_key(workload)
    if wanted in found:
        return wanted
    target = _tokens(size, workload)
    return min(found, key=lambda k: abs(math.log(_tokens(size, _shaped(workload, k)) / target)))


def measured_block_times(
    measured: Measurements, device_name: str, size: ComponentSize, workload: Workload, device: DeviceProfile
) -> tuple[tuple[float, ...], str] | None:
    """Block times for ``size`` under ``workload`` from this device's measurements, and where they came from.

    Returns the measured times for this very shape, else those of the measured shape nearest in tokens per
    call, each block scaled by the cost model's estimate for ``workload`` over its estimate for the measured
    shape; ``None`` when this DiT was never measured on this device.
    """
    from .costmodel import estimated_block_times

    found = measured.shapes(device_name, size)
    key = measurement_basis(measured, device_name, size, workload)
    if key is None:
        return None
    if key == shape_key(workload):
        return found[key].seconds, "measured"
    height, width, frames = key[:3]
    then = estimated_block_times(size, _shaped(workload, key), device)
    now = estimated_block_times(size, workload, device)
    scaled = tuple(m * n / t if t > 0 else m for m, n, t in zip(found[key].seconds, now, then, strict=True))
    return scaled, f"scaled from the measurement at {width}×{height}" + (f"×{frames}" if frames > 1 else "")


def with_measured_times(
    workload: Workload, inventory: Inventory, measured: Measurements, device_name: str, device: DeviceProfile
) -> tuple[Workload, dict[str, str]]:
    """``workload`` with ``block_compute_s`` filled from this device's measurements where the caller gave none,
    and per DiT where its times came from."""
    times = dict(workload.block_compute_s)
    sources: dict[str, str] = {}
    for size in inventory.components:
        if size.role != "dit" or not size.block_bytes or size.name in times:
            continue
        found = measured_block_times(measured, device_name, size, workload, device)
        if found is not None:
            times[size.name], sources[size.name] = found
    if not sources:
        return workload, sources
    return dataclasses.replace(workload, block_compute_s=times), sources
