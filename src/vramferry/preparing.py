"""What :func:`~vramferry.apply` decides before it changes anything: the modules, the device and its measured links,
the codec, and the first plan (``vramferry compress`` decides the same way)."""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import replace
from typing import Any

import torch

from .compat import check_component_names, check_foreign_hooks, check_plan, request_order_of, resolve_device
from .config import OffloadConfig
from .discovery.modules import PipelineModules
from .errors import DeviceError, PlanError
from .planning.calibrate import Measurements
from .planning.handle_state import _first_plan, _Planning
from .planning.plan import Plan
from .runtime.probe import device_profile, helper_links, measure_decode_speed

logger = logging.getLogger(__name__)

#: Live handles by pipeline and by module (what a second apply, or a peer's hooks, is checked against).
LIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_apply(
    pipeline: object,
    config: OffloadConfig,
    workload: Any = None,
    plan: Plan | None = None,
    measured: Any = None,
) -> tuple[PipelineModules, torch.device, _Planning, Plan, Any]:
    """What :func:`apply` decides before it changes anything: ``(modules, device, planning, plan, codec choice)``
    (``vramferry compress`` compresses the pieces this plan compresses)."""
    from .discovery.inventory import inventory_of
    from .discovery.roles import discover
    from .planning.planner import default_workload, with_schedule
    from .runtime.codecs import select_codec
    from .runtime.install import check_weights_materialised

    clock = _Clock()
    device = resolve_device(config)
    modules = discover(pipeline, strict=config.strict, block_attrs=dict(config.block_attrs) or None)
    check_foreign_hooks(modules, LIVE)
    check_weights_materialised(modules, device)
    check_component_names(config, modules)
    inventory = inventory_of(modules, request_order_of(config, modules))
    if plan is not None and workload is not None:
        raise PlanError("apply: give either plan= or workload= (the plan was sized for its own workload)")
    clock.lap("discovery")
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    measured = measured if measured is not None else Measurements()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    profile = None
    if device.type == "cuda":
        profile = device_profile(device, measured.h2d_bytes_per_s.get(name))
        measured.h2d_bytes_per_s[name] = profile.h2d_bytes_per_s
    links = _helper_links(config, device)
    if links:
        profile = replace(profile, helper_bytes_per_s=tuple(rate for _d, _distinct, rate in links))
    clock.lap("device")
    work = workload if workload is not None else default_workload(inventory)
    coding = select_codec(config.compression, device, modules)
    clock.lap("codec")  # the weights are sampled for their ratios during planning, where a plan needs them
    if profile is not None and coding.codec is not None and coding.codec.device_type == "cuda":
        profile = _with_decode_speed(profile, coding.codec, device, name, measured)
    clock.lap("decode probe")
    planning = _Planning(inventory, profile, free, work, name, measured, ratios=coding.ratios)
    planning.links = links
    if plan is not None:
        check_plan(plan, modules)
        the_plan = plan if plan.schedule else with_schedule(plan, inventory, config)
    else:
        the_plan = _first_plan(planning, config, work, coding.missing)
    clock.lap("planning")
    planning.seconds = clock.seconds
    return modules, device, planning, the_plan, coding


def _helper_links(config: OffloadConfig, device: torch.device) -> list:
    """The helper GPUs' links, measured (``[]`` without ``helper_devices``)."""
    if not config.helper_devices:
        return []
    if device.type != "cuda":
        raise DeviceError(
            f"helper_devices={list(config.helper_devices)}: helper GPUs lend their links to a CUDA execution "
            f"device, and onload_device is {config.onload_device!r}; drop helper_devices or run on a GPU"
        )
    return helper_links(device, config.helper_devices)


class _Clock:
    """Seconds per step of ``apply``, for :attr:`OffloadStats.apply_seconds`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, what: str) -> None:
        now = time.perf_counter()
        self.seconds[what] = round(self.seconds.get(what, 0.0) + now - self._last, 4)
        self._last = now


def _with_decode_speed(profile, codec, device, name: str, measured: Measurements):
    """``profile`` with ``codec``'s decode speed measured on ``device`` (once per device and codec)."""
    key = (name, codec.name)
    if key not in measured.decode_bytes_per_s:
        measured.decode_bytes_per_s[key] = measure_decode_speed(codec, device)
        logger.info(
            "calibrated %s: %s decodes %.0f GB/s", name, codec.name, measured.decode_bytes_per_s[key] / 1e9
        )
    return replace(profile, decode_bytes_per_s=measured.decode_bytes_per_s[key])

