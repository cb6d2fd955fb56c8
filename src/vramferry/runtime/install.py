"""Turns a :class:`~vramferry.planning.Plan` into units, host arenas, device copies and hooks."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..discovery.modules import PipelineModules
from ..errors import OffloadError, PlanError
from ..planning.plan import Plan
from ..planning.planner import Placement
from ..planning.policy import policy
from .hooks import HookSet
from .layerwise import BlockStreamer
from .model import ComponentState, SwapScheduler
from .store import HostStore, TensorRef, Unit, collect_refs
from .transfer import Mover

logger = logging.getLogger(__name__)

#: A staged load's stages hold at least this many bytes (consecutive blocks merged): copies of this size run
#: at the link's full rate, and there are at most a few dozen events per load.
STAGE_BYTES = 64 * 2**20


@dataclass
class _Pieces:
    """Modules of one component grouped by placement before packing."""

    resident: list[nn.Module] = field(default_factory=list)
    swap: list[nn.Module] = field(default_factory=list)
    streamed: list[tuple[str, nn.Module]] = field(default_factory=list)
    exclude: set[int] = field(default_factory=set)  # block modules, not part of the component's rest


class Runtime:
    """The live state behind an :class:`~vramferry.api.OffloadHandle`."""

    def __init__(
        self,
        modules: PipelineModules,
        plan: Plan,
        *,
        device: torch.device,
        pin: bool,
        pin_limit: int | None,
        verify: bool,
    ) -> None:
        self.modules = modules
        self.plan = plan
        self.device = device
        self.mover = Mover(device)
        self.store = HostStore(pin=pin and device.type == "cuda", pin_limit=pin_limit)
        self.hooks = HookSet()
        self.states: list[ComponentState] = []
        self.shared: Unit | None = None
        self.verify = verify
        self.uniform_slots = not plan.exclusive
        self._build_units()
        self.scheduler = SwapScheduler(self.mover, self.states, plan.schedule)
        self._load_resident()
        self._install_hooks()

    # -- building -------------------------------------------------------------------------------------------
    def _pieces(self, name: str) -> _Pieces:
        component = self.modules.get(name)
        cplan = self.plan.get(name)
        pieces = _Pieces()
        blockset = self.modules.blocks_of(name)  # a DiT's blocks, or an encoder's layers
        if blockset is not None and cplan.blocks:
            if len(cplan.blocks) != len(blockset.blocks):
                raise PlanError(
                    f"{name}: the plan places {len(cplan.blocks)} blocks but discovery found {len(blockset.blocks)}"
                )
            for block_name, block, placement in zip(
                blockset.names, blockset.blocks, cplan.blocks, strict=True
            ):
                pieces.exclude.add(id(block))
                if placement is Placement.STREAMED:
                    pieces.streamed.append((block_name, block))
                elif placement is Placement.RESIDENT:
                    pieces.resident.append(block)
                else:
                    pieces.swap.append(block)
        elif cplan.placement is Placement.STREAMED or cplan.streamed_blocks:
            raise PlanError(f"{name}: only blocks can be streamed, and discovery found none in {name}")
        rest = pieces.resident if cplan.placement is Placement.RESIDENT else pieces.swap
        rest.insert(0, component.module)
        return pieces

    def _build_units(self) -> None:
        claimed: dict[int, TensorRef] = {}
        group_of: dict[int, str] = {}
        shared: dict[int, TensorRef] = {}

        def collect(
            key: str, mods: list[nn.Module], exclude: set[int]
        ) -> list[tuple[nn.Module, list[TensorRef]]]:
            per_module = []
            for module in mods:
                new, seen = collect_refs(module, exclude - {id(module)}, claimed)
                for ref in new:
                    group_of[id(ref)] = key
                per_module.append((module, new))
                # A tensor reached from two units (tied weights across blocks or components) must be on the
                # device whenever either runs: it goes to a shared resident unit.
                shared.update((id(r), r) for r in seen if group_of[id(r)] != key)
            return per_module

        plans = []
        for component in self.modules.components():
            pieces = self._pieces(component.name)
            groups = {
                kind: collect(f"{component.name}:{kind}", getattr(pieces, kind), pieces.exclude)
                for kind in ("resident", "swap")
            }
            streamed = [
                (n, b, [r for _m, refs in collect(f"{component.name}.{n}", [b], set()) for r in refs])
                for n, b in pieces.streamed
            ]
            plans.append((component, groups, streamed, pieces.exclude))
        arenas = []
        for component, groups, streamed, blocks in plans:
            state = ComponentState(component.name, str(component.role), component.module)
            units = []
            for kind, per_module in groups.items():
                per_module = [(m, [r for r in refs if id(r) not in shared]) for m, refs in per_module]
                refs = [r for _m, module_refs in per_module for r in module_refs]
                if refs:
                    unit = Unit(f"{component.name}:{kind}", refs)
                    if kind == "swap" and policy(state.role).staged:
                        # The DiT's first call after a load computes block by block as the copy lands.
                        unit.set_stages([(m, r) for m, r in per_module if id(m) in blocks], STAGE_BYTES)
                    setattr(state, kind, unit)
                    units.append(unit)
            block_units = []
            for block_name, block, refs in streamed:
                unit = Unit(f"{component.name}.{block_name}", [r for r in refs if id(r) not in shared])
                unit.extra["module"] = block
                block_units.append(unit)
            units.extend(block_units)
            arenas.append((component.name, units))
            if block_units:
                depth = self.plan.get(component.name).prefetch_depth or 2
                state.streamer = BlockStreamer(
                    self.mover, component.name, block_units, depth, uniform=self.uniform_slots
                )
            self.states.append(state)
        if shared:
            self.shared = Unit("shared", list(shared.values()))
            arenas.append(("shared", [self.shared]))
        for name, units in arenas:
            self.store.add(name, units)

    def _load_resident(self) -> None:
        for unit in [s.resident for s in self.states if s.resident is not None] + (
            [self.shared] if self.shared is not None else []
        ):
            self.mover.onload_async(unit)
            self.mover.wait_ready(unit)

    def all_units(self) -> list[Unit]:
        units = []
        for state in self.states:
            units.extend(u for u in (state.resident, state.swap) if u is not None)
            if state.streamer is not None:
                units.extend(state.streamer.units)
        if self.shared is not None:
            units.append(self.shared)
        return units

    def described_units(self) -> list[tuple[str, str, Unit]]:
        """Every unit as ``(component, kind, unit)``; kind is ``resident``, ``swap``, ``block`` or ``shared``."""
        found = []
        for state in self.states:
            found += [
                (state.name, kind, u) for kind, u in (("resident", state.resident), ("swap", state.swap)) if u
            ]
            if state.streamer is not None:
                found += [(state.name, "block", u) for u in state.streamer.units]
        if self.shared is not None:
            found.append(("", "shared", self.shared))
        return found

    def units_by_module(self) -> dict[int, list[Unit]]:
        """Module id -> the units holding its own tensors."""
        owners: dict[int, list[Unit]] = {}
        for unit in self.all_units():
            for ref in unit.refs:
                for module, _name in ref.owners:
                    bucket = owners.setdefault(id(module), [])
                    if unit not in bucket:
                        bucket.append(unit)
        return owners

    def placement(self) -> dict[str, str]:
        """Per unit, ``"device"`` or ``"host"``: where its weights are bound right now."""
        return {u.name: ("device" if u.on_device else "host") for u in self.all_units()}

    # -- hooks ----------------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        from .hooks import install_component_hooks

        for state in self.states:
            install_component_hooks(self, state)


def check_weights_materialised(modules: PipelineModules) -> None:
    """Raise if any weight is on the meta device (nothing to copy)."""
    for component in modules.components():
        for name, tensor in list(component.module.named_parameters()) + list(
            component.module.named_buffers()
        ):
            if tensor.device.type == "meta":
                raise OffloadError(
                    f"{component.name}.{name} is on the meta device; load the weights (from_pretrained or "
                    "to_empty + load_state_dict) before applying offload"
                )
