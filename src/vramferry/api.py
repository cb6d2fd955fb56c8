"""The public verb: ``apply(pipeline, config) -> OffloadHandle``."""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import replace
from typing import Any

import torch

from .compat import (
    check_plan,
    patch_pipeline_class,
    request_order_of,
)
from .config import OffloadConfig
from .discovery.inventory import Inventory
from .discovery.modules import PipelineModules
from .errors import ConflictError, OffloadError
from .planning.calibrate import (
    BlockTimes,
    Measurements,
    shape_key,
    workload_key,
)
from .planning.devices import DeviceProfile, profile_from
from .planning.handle_state import _make_plan, _measured_inputs, _Planning
from .planning.plan import Plan
from .planning.planner import with_schedule
from .planning.workload import Workload
from .preparing import LIVE as _LIVE
from .preparing import plan_apply
from .runtime.install import Runtime, mapped_flags
from .runtime.reads import WeightReads
from .runtime.transfer import TransferCounters
from .stats import OffloadStats, UnitInfo

logger = logging.getLogger(__name__)




class OffloadHandle:
    """What :func:`apply` returns: the plan, live statistics, and ``remove()`` to undo everything.

    Also a context manager: ``with vramferry.apply(pipe, cfg): ...`` removes on exit.
    """

    def __init__(
        self,
        pipeline: object,
        config: OffloadConfig,
        modules: PipelineModules,
        plan: Plan,
        runtime: Runtime,
        patched_class: type | None,
    ) -> None:
        self.pipeline = pipeline
        self.config = config
        self.modules = modules
        self.plan = plan
        self._runtime = runtime
        self._patched_class = patched_class
        self._removed = False

    @property
    def device(self) -> torch.device:
        return self._runtime.device

    @property
    def active(self) -> bool:
        return not self._removed

    @property
    def inventory(self) -> Inventory:
        """The pipeline's sizes as the planner sees them (components, blocks, request order)."""
        return self._planning.inventory

    @property
    def workload(self) -> Workload:
        """The request shape the current plan was made for."""
        return self._planning.workload

    @property
    def device_profile(self) -> DeviceProfile | None:
        """The speeds and memory the plan was made for (``None`` on the CPU: a GPU preset's timings)."""
        return self._planning.profile

    def stats(self) -> OffloadStats:
        """Counters since apply (or the last :meth:`reset_stats`). Synchronises the device once to read timers."""
        runtime = self._runtime
        mover = runtime.mover
        mover.fold(block=True)
        c = mover.counters
        stats = OffloadStats(
            mode=self.plan.mode.value,
            bytes_h2d=c.bytes_h2d,
            bytes_d2h=c.bytes_d2h,
            copy_seconds=round(c.copy_seconds, 6),
            h2d_gbps=round(c.bytes_h2d / c.copy_seconds / 1e9, 3) if c.copy_seconds > 0 else 0.0,
            wait_seconds=round(c.wait_seconds, 6),
            swaps=c.swaps,
            blocks_streamed=c.blocks_streamed,
            sync_loads=c.sync_loads,
            unplanned_phases=c.unplanned_phases,
            host_pinned_bytes=runtime.store.pinned_bytes,
            host_pageable_bytes=runtime.store.pageable_bytes,
            host_mapped_bytes=runtime.store.mapped_bytes,
            host_shared_bytes=runtime.store.shared_bytes,
            host_shared_found_bytes=runtime.store.shared_found_bytes,
            apply_seconds=dict(runtime.apply_seconds),
            link_bytes=tuple(runtime.mover.links.bytes_by_link) if runtime.mover.links is not None else (),
            host_compressed_bytes=runtime.store.encoded_bytes,
            host_compressed_raw_bytes=runtime.store.encoded_raw_bytes,
            bytes_decoded=c.bytes_decoded,
            compressed_from_cache=runtime.store.cached_pieces,
            compressed_at_apply=runtime.store.encoded_pieces,
            repacked_bytes=c.repacked_bytes,
            repacked_pieces=c.repacked_pieces,
            host_file_bytes=runtime.filled.file_bytes,
            host_fill_seconds=round(runtime.filled.seconds, 6),
            loaded_while_filling_bytes=runtime.loaded_while_filling,
            dit_calls=c.dit_calls,
            dit_call_seconds=round(c.dit_seconds / c.dit_calls, 6) if c.dit_calls else 0.0,
            # On the CPU the plan's times describe a GPU preset, not this run: leave them out.
            predicted_step_seconds=self.plan.predicted_step_s if runtime.device.type == "cuda" else None,
        )
        if runtime.device.type == "cuda":
            stats.peak_allocated = torch.cuda.max_memory_allocated(runtime.device)
            stats.peak_reserved = torch.cuda.max_memory_reserved(runtime.device)
        stats.block_seconds = {name: round(sum(t.seconds), 6) for name, t in self.block_times().items()}
        return stats

    def units(self) -> list[UnitInfo]:
        """Every unit of the host store, with its size and where its weights are bound now."""
        return [
            UnitInfo(
                unit.name,
                component,
                kind,
                unit.nbytes,
                "device" if unit.on_device else "host",
                len(unit.stages),
            )
            for component, kind, unit in self._runtime.described_units()
        ]

    def block_times(self) -> dict[str, BlockTimes]:
        """Per DiT, the compute seconds of each block in one call, measured during its first calls (the first
        is left out, the next two are measured), once they have run. Measurements are kept per device and
        request shape, and :meth:`replan` plans with them. Synchronises the device once to read the timers."""
        found = {}
        for state in self._runtime.states:
            clock = state.clock
            times = clock.times(block=True) if clock is not None else None
            if times is None:
                continue
            found[state.name] = times
            if state.name not in self._planning.recorded:
                size = self._planning.inventory.get(state.name)
                self._planning.measured.record(
                    self._planning.device_name, size, self._planning.workload, times
                )
                self._planning.recorded.add(state.name)
        return found

    @property
    def measurements(self) -> Measurements:
        """What this handle measured (host→device bandwidth, block times per request shape), as data:
        :meth:`replan` plans with it, and ``apply(..., measured=handle.measurements)`` starts another handle
        from it."""
        self.block_times()
        return self._planning.measured

    @property
    def has_new_measurements(self) -> bool:
        """Block times were measured that the current plan does not use yet (:meth:`replan` would use them)."""
        for state in self._runtime.states:
            clock = state.clock
            if clock is None or self._planning.sources.get(state.name) == "measured":
                continue
            if clock.times(block=False) is not None:
                return True
        return False

    def reset_stats(self) -> None:
        """Zero the counters and the device's peak-memory statistics."""
        mover = self._runtime.mover
        mover.fold(block=True)
        mover.counters = TransferCounters()
        if mover.links is not None:
            mover.links.bytes_by_link = [0] * len(mover.links.bytes_by_link)
        if self._runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._runtime.device)

    def remove(self) -> None:
        """Take every hook off and put every weight back on the device it was on before ``apply``."""
        if self._removed:
            return
        runtime = self._runtime
        try:
            # Changes made since the last request (an adapter fused into a device copy) reach the host copies,
            # which become the module's own tensors below.
            changes = runtime.changes()
            if changes is not None:
                runtime.repack(changes, None)
        except OffloadError as exc:
            logger.warning("vramferry: remove() restores the weights as they were last packed: %s", exc)
        runtime.hooks.remove()
        runtime.mover.synchronize()  # copies in flight must land before their buffers are released
        for state in runtime.states:
            if state.streamer is not None:
                state.streamer.stop()
        # The device copies go now, not when the handle is collected: a caller that applies again before
        # dropping this handle would otherwise hold both plans' device memory at once.
        for unit in runtime.all_units():
            if unit.on_device:
                runtime.mover.drop(unit)
        runtime.store.restore()
        if self._patched_class is not None:
            self.pipeline.__class__ = self._patched_class
        for key in [k for k, v in list(_LIVE.items()) if v is self]:
            del _LIVE[key]
        self._removed = True

    def replan(self, workload: Any = None, *, plan: Plan | None = None) -> bool:
        """Plan again, for another request shape (resolution, frames, batch, steps) or with the block times
        measured since the last plan; re-place the weights on the device when the placement changes.

        Call it when requests change shape (the server does): activations grow with the resolution, and what
        the budget leaves for weights shrinks. Call it without a workload after the first request to plan with
        the block times measured on this device instead of the cost model's estimates. Re-placing is a device
        transition: blocks that become resident are copied, those that stop are dropped, streaming slots are
        rebuilt; the host store is never repacked, so it costs about the bytes whose residency changes over the
        host→device bandwidth. Plans are cached per request shape. When shapes alternate, a placement that fits
        the new shape is kept while what it loses per request, summed over the requests at that shape, stays
        below the cost of switching (so a larger shape's placement can serve smaller ones).

        Args:
            workload: the new request's :class:`~vramferry.planning.Workload`; ``None``: the current one.
            plan: carry out this plan (made for this pipeline, as for :func:`apply`) instead of planning; it is
                taken as given, without the keep-or-switch rule.

        Returns:
            True if the weights were re-placed, False if only the plan's predictions changed.

        Raises:
            BudgetError: the new shape does not fit the budget; the handle is left as it was.
        """
        if self._removed:
            raise OffloadError(f"{self!r} was removed; apply again instead of replanning")
        self.refresh()
        self.block_times()  # keep what was measured under the current shape before planning another
        planning = self._planning
        work = workload if workload is not None else planning.workload
        if plan is not None:
            check_plan(plan, self.modules)
            new = plan if plan.schedule else with_schedule(plan, planning.inventory, self.config)
            sources = planning.sources
            planning.given = True
        else:
            new, sources = self._cached_plan(work)
            planning.given = False
            if new.placements != self.plan.placements:
                new = self._kept_placement(new, work) or new
        if new.placements == self.plan.placements:
            self.plan = new
            recorded = planning.recorded
            if shape_key(work) != shape_key(planning.workload):
                # What the clocks measured belongs to the old shape (kept above): measure the new one afresh.
                for state in self._runtime.states:
                    if state.clock is not None:
                        state.clock.restart()
                recorded = set()
            self._planning = replace(planning, workload=work, sources=sources, recorded=recorded)
            return False
        moved = self._runtime.transition(new)
        self.plan = new
        # Keep measuring against the same device, for the shape the new plan was made for.
        self._planning = replace(planning, workload=work, sources=sources, recorded=set(), losses={})
        logger.info(
            "vramferry: re-placed %s for a new request shape (%.2f GB copied)",
            type(self.pipeline).__name__,
            moved / 1e9,
        )
        return True

    def refresh(self) -> bool:
        """Take in what was changed in the components' tensors since the last request: adapters added
        (``add_adapter``, ``load_lora_weights``), deleted (``delete_adapters``, ``unload_lora_weights``), fused
        or unfused (``fuse_lora``, ``unfuse_lora``). Only the pieces whose tensors changed (a component's non-block
        part, each of its blocks) are packed into the host store again, from the tensors as they are now; the
        pieces they replace are released. The pipeline is then planned again for its new sizes (a plan given to
        :func:`apply` or :meth:`replan` keeps its placements) and its weights re-placed.

        A pipeline call does this first on its own, and so do :meth:`replan` and :meth:`remove`; call it after a
        change when a component is then called on its own (``pipe.vae.decode(...)``), which otherwise raises.

        Returns:
            True if something changed.

        Raises:
            BudgetError: the pipeline no longer fits the budget with its new sizes; nothing was changed.
            OffloadError: the change cannot be taken in (the message names it and the fix).
        """
        from .discovery.inventory import inventory_of

        if self._removed:
            raise OffloadError(f"{self!r} was removed; apply again instead")
        runtime = self._runtime
        changes = runtime.changes()
        if changes is None:
            return False
        self.block_times()  # what was measured under the old sizes is kept
        inventory = inventory_of(self.modules, request_order_of(self.config, self.modules))
        planning = replace(self._planning, inventory=inventory, plans={}, losses={}, recorded=set())
        if planning.given:
            new = self.plan
        else:
            key = (workload_key(planning.workload), _measured_inputs(planning, planning.workload))
            made, planning.sources = _make_plan(planning, self.config, planning.workload)
            planning.plans[key] = (made, planning.sources, planning.workload)
            new = made
        nbytes = runtime.repack(changes, new)
        self.plan = new
        planning.pack_mapped(mapped_flags(runtime.pieces))  # pieces packed again are no longer mapped
        self._planning = planning
        logger.info(
            "vramferry: packed %s again after their tensors changed (%d pieces, %.3f GB)",
            ", ".join(changes.new),
            sum(len(pieces) for pieces in changes.new.values()),
            nbytes / 1e9,
        )
        return True

    def prepare(self, workloads: Any) -> list[Plan]:
        """Plan for each of ``workloads`` now (the plans are cached, so that a later :meth:`replan` to one of
        these shapes costs no planning); the weights stay where they are. Returns the plans in order."""
        return [self._cached_plan(work)[0] for work in workloads]

    def plans(self) -> list[tuple[Workload, Plan]]:
        """The plans made so far for the current measurements, each with the request shape it is for."""
        planning = self._planning
        return [
            (work, made)
            for (key, inputs), (made, _s, work) in planning.plans.items()
            if inputs == _measured_inputs(planning, work)
        ]

    def _cached_plan(self, work: Any) -> tuple[Plan, dict[str, str]]:
        """The plan for ``work``: made once per request shape and the measurements it is planned with, then
        reused (a measurement at another shape leaves it valid unless this shape's times are scaled from it)."""
        planning = self._planning
        key = (workload_key(work), _measured_inputs(planning, work))
        if key not in planning.plans:
            planning.plans[key] = (*_make_plan(planning, self.config, work), work)
        made, sources, _work = planning.plans[key]
        return made, sources

    def _kept_placement(self, new: Plan, work: Any) -> Plan | None:
        """The current placement priced for ``work``, when it fits and keeping it has cost less, over the
        requests at this shape so far, than switching to ``new`` would (bytes to copy over the bandwidth)."""
        from .planning.planner import keep_placement, price, transition_bytes

        planning = self._planning
        if self.plan.predicted_request_s is None or new.predicted_request_s is None:
            return None
        kept = price(
            self.plan,
            planning.inventory,
            self.config,
            device=planning.plan_profile,
            workload=work,
            free_bytes=planning.free,
            measured=planning.measured,
            device_name=planning.device_name,
        )
        if kept is None:
            return None
        bandwidth = (planning.profile or profile_from()).h2d_bytes_per_s
        switch_s = transition_bytes(self.plan, new, planning.inventory) / bandwidth
        key = workload_key(work)
        lost = keep_placement(
            kept.predicted_request_s, new.predicted_request_s, switch_s, planning.losses.get(key, 0.0)
        )
        if lost is None:
            return None
        planning.losses[key] = lost
        return kept

    def __enter__(self) -> OffloadHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "live"
        return f"<OffloadHandle {state} mode={self.plan.mode.value} pipeline={type(self.pipeline).__name__}>"


def apply(
    pipeline: object,
    config: OffloadConfig | None = None,
    *,
    workload: Any = None,
    plan: Plan | None = None,
    measured: Measurements | None = None,
    progress: bool | None = None,
    **changes: Any,
) -> OffloadHandle:
    """Offload ``pipeline``'s weights as ``config`` says, and return the handle that undoes it.

    Args:
        pipeline: a diffusers pipeline, a pipeline declaring :class:`~vramferry.SupportsModuleOffload`, or any
            object whose modules sit under well-known attribute names.
        config: what to do; defaults to ``OffloadConfig()`` (auto mode, free memory as the budget).
        workload: the request shape (:class:`~vramferry.planning.Workload`) the auto planner sizes
            activations and compute for; defaults to the pipeline's usual shape.
        plan: a ready :class:`~vramferry.planning.Plan` to carry out instead of planning (one made by
            :func:`~vramferry.planning.plan` for this pipeline, read back with ``plan_from_dict``, or edited). It
            must name exactly the components discovery finds, and give each component with blocks one placement
            per block (or none). The config still sets the device, pinning and the other runtime options.
        measured: what an earlier handle measured (:attr:`OffloadHandle.measurements`): its bandwidth and block
            times replace the probe and the cost model's estimates; new measurements are added to it.
        progress: show a progress bar (bytes, GB/s) while the host store fills (from the checkpoint files for
            weights that are mapped views of them); ``None``: only when vramferry logs at INFO level.
        **changes: field overrides applied to a copy of ``config`` (``mode="model"``).

    Returns:
        An :class:`OffloadHandle`: ``.plan``, ``.stats()``, ``.remove()``.

    Raises:
        ConflictError: the pipeline (or one of its modules) is already offloaded, by vramferry or a peer.
        DeviceError: the execution device is not usable.
        DiscoveryError, PlanError, BudgetError: see their messages; a ``plan`` that does not match the
            pipeline, or one given together with a ``workload``, raises :class:`~vramferry.errors.PlanError`.
    """
    from .runtime.cache import open_cache

    config = config if config is not None else OffloadConfig()
    if changes:
        config = config.replace(**changes)
    _check_live(pipeline)
    modules, device, planning, the_plan, coding = plan_apply(pipeline, config, workload, plan, measured)
    cache = open_cache(pipeline, config.compression_cache, coding.codec, modules)
    runtime = _installed(modules, the_plan, config, device, progress, coding.codec, cache, planning)
    reads = (
        WeightReads(runtime.all_units, [c.module for c in modules.components()]) if config.verify else None
    )
    holder: list[weakref.ref] = []
    patched = patch_pipeline_class(pipeline, device, reads, before_call=lambda: _refresh(holder))
    handle = OffloadHandle(pipeline, config, modules, the_plan, runtime, patched)
    holder.append(weakref.ref(handle))
    planning.pack(the_plan)
    planning.pack_mapped(mapped_flags(runtime.pieces))
    planning.given = plan is not None
    handle._planning = planning
    _LIVE[pipeline] = handle
    for component in modules.components():
        _LIVE[component.module] = handle
    logger.info(
        "vramferry: %s applied to %s (%s)",
        the_plan.mode.value,
        type(pipeline).__name__,
        ", ".join(f"{what} {seconds:.2f} s" for what, seconds in runtime.apply_seconds.items()),
    )
    return handle


def _runtime(
    modules: PipelineModules,
    plan: Plan,
    config: OffloadConfig,
    device: torch.device,
    progress: bool | None,
    codec: Any = None,
    cache: Any = None,
    planning: _Planning | None = None,
) -> Runtime:
    from .runtime.links import Links, link_shares
    from .runtime.shared import SHARED_DIR
    from .units import parse_bytes

    limit = parse_bytes(config.host_memory_limit) if config.host_memory_limit is not None else None
    helpers = None
    if planning is not None and planning.links:
        rates = [(distinct, rate) for _device, distinct, rate in planning.links]
        shares = link_shares(planning.profile.h2d_bytes_per_s, rates)
        helpers = Links(device, [helper for helper, _distinct, _rate in planning.links], shares)
    share = config.share_host_store
    return Runtime(
        modules,
        plan,
        share_dir=(SHARED_DIR if share is True else share) or None,
        device=device,
        pin=config.pin_memory,
        pin_limit=limit,
        verify=config.verify,
        codec=codec,
        cache=cache,
        progress=progress,
        links=helpers,
    )


def _installed(
    modules: PipelineModules,
    plan: Plan,
    config: OffloadConfig,
    device: torch.device,
    progress: bool | None,
    codec: Any,
    cache: Any,
    planning: _Planning,
) -> Runtime:
    """The runtime (:func:`_runtime`), the kernel warm-up running beside its fill, with ``apply_seconds`` set."""
    start = time.perf_counter()
    warming = _warm_up(modules, plan, planning, device) if config.warm_up else None
    try:
        runtime = _runtime(modules, plan, config, device, progress, codec, cache, planning)
        installed = time.perf_counter()
    finally:
        warmed = warming.join() if warming is not None else None
    runtime.apply_seconds = {
        **planning.seconds,
        "host store": round(runtime.pack_seconds, 4),
        "of which filling": round(runtime.filled.seconds, 4),
        "of which page-locking": round(runtime.store.locker.seconds, 4),
        "device loads and hooks": round(installed - start - runtime.pack_seconds, 4),
        **({"kernel warm-up, beside the rest": round(warmed, 4)} if warmed is not None else {}),
    }
    return runtime


def _warm_up(modules: PipelineModules, plan: Plan, planning: _Planning, device: torch.device) -> Any:
    """On a GPU, the kernel warm-up (:mod:`~vramferry.runtime.warmup`) started on its own thread; it holds at most
    the activation memory the plan keeps free for a request."""
    from .runtime.warmup import DEFAULT_LIMIT, Warmup, pipeline_ops

    if device.type != "cuda" or not isinstance(planning.workload, Workload):
        return None
    limit = plan.activation_bytes if plan.activation_bytes else DEFAULT_LIMIT
    return Warmup(pipeline_ops(modules, planning.workload), device, limit).start()


def _refresh(holder: list[weakref.ref]) -> None:
    """Before each pipeline call: take in changes made to the components' tensors since the last one."""
    handle = holder[0]() if holder else None
    if handle is not None and handle.active:
        handle.refresh()


def _check_live(pipeline: object) -> None:
    try:
        live = _LIVE.get(pipeline)
    except TypeError:
        live = None
    if live is not None:
        raise ConflictError(
            f"{type(pipeline).__name__} is already offloaded by {live!r}; call handle.remove() before applying again"
        )
