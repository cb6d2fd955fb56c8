"""Model-level offload: whole components swapped onto the device when they run.

Rules (vLLM-Omni's, extended): a DiT and the encoders are mutually exclusive on the device, and so are DiTs
with each other (Wan 2.2's experts); VAEs and other components are loaded when they run and stay until the
budget needs their room. Evicting drops the device copy: the host copy is canonical, so nothing travels back.
While one component runs, the next one is loaded if the budget allows: the next in pipeline order, or, across
phases, the one that started the next phase last time. At a phase change a component of another phase leaves
when the one expected next excludes it (or always, under an explicit budget). A DiT's load is staged: its blocks
each wait only for their own part of the copy, so its first call computes while the copy lands.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ..errors import OffloadError
from .store import Unit
from .transfer import Mover

logger = logging.getLogger(__name__)

_PHASE_ROLES = ("dit", "encoder", "vae")


def count_tensors(module: nn.Module) -> int:
    return sum(1 for _ in module.parameters()) + sum(1 for _ in module.buffers())


@dataclass(eq=False)
class ComponentState:
    """A component at run time.

    Attributes:
        resident: the part that stays on the device from apply to remove (may be None).
        swap: the part loaded when the component runs (may be None).
        streamer: the streamed blocks of a DiT (layerwise), or None.
        clock: measures a DiT's block times during its first calls, or None.
        running: how many of its entry modules are executing now (never evicted while > 0).
        engaged: the component has run since its swap part was loaded (exclusion already applied).
        tensors: how many parameters and buffers the module held when its units were packed.
    """

    name: str
    role: str
    module: nn.Module
    resident: Unit | None = None
    swap: Unit | None = None
    streamer: object | None = None
    clock: object | None = None  # a DiT's BlockClock (its blocks' measured compute times)
    running: int = 0
    engaged: bool = False
    last_used: int = 0
    tensors: int = -1

    def __post_init__(self) -> None:
        self.tensors = count_tensors(self.module)

    def check_unchanged(self) -> None:
        """Raise if tensors were added to or removed from the module since apply (an adapter loaded, a layer
        replaced): the host store packed the old ones, and the new ones would never reach the device."""
        now = count_tensors(self.module)
        if now != self.tensors:
            raise OffloadError(
                f"{self.name}: it holds {now} parameters and buffers, {self.tensors} when offload was applied "
                "(an adapter such as LoRA loaded, fused or unloaded, or a layer replaced, while the handle was "
                "live). Call handle.remove(), make the change, then apply again."
            )

    @property
    def swap_bytes(self) -> int:
        return self.swap.nbytes if self.swap is not None else 0

    @property
    def stream_bytes(self) -> int:
        return self.streamer.slot_bytes if self.streamer is not None else 0

    @property
    def loaded(self) -> bool:
        return self.swap is None or self.swap.on_device


class SwapScheduler:
    """Decides which swapped components are on the device.

    Args:
        mover: issues the copies.
        components: every component, in pipeline order.
        order: the order a request runs components in (for prefetch); empty = learn it from the first request.
        budget: device bytes available for weights; ``None`` = no limit besides the exclusion rules.
        prefetch: load the next component while the current one computes.
        explicit_budget: the user gave the budget, and the plan counts each component's swapped part and
            streaming slots in its own phase only. Then a new phase evicts the other phases' swapped parts, and
            prefetch may load a component that excludes one on the device now (evicted when the prefetched one
            runs). Otherwise the exclusion rules hold strictly and a component of another phase leaves at a phase
            change only when the component expected to start the next phase excludes it.
    """

    def __init__(
        self,
        mover: Mover,
        components: list[ComponentState],
        order: list[str],
        budget: int | None,
        prefetch: bool,
        explicit_budget: bool = False,
    ) -> None:
        self.mover = mover
        self.components = components
        self.by_name = {c.name: c for c in components}
        self.order = [n for n in order if n in self.by_name]
        self.learning = not self.order
        self.budget = budget
        self.prefetch = prefetch
        self.explicit_budget = explicit_budget
        self.clock = 0
        self.phase = ""
        self.phase_leader: ComponentState | None = None  # the component that started the current phase
        self.next_leader: dict[str, str] = {}  # phase leader -> the leader of the phase that followed it last
        self.trace: list[tuple[str, str]] = []  # (event, component) for tests and debugging
        self.keep_trace = False

    # -- the hot path -------------------------------------------------------------------------------------
    def activate(self, comp: ComponentState) -> None:
        """Make ``comp``'s weights usable by the next kernel on the compute stream."""
        self.clock += 1
        comp.last_used = self.clock
        if comp.role != self.phase and comp.role in _PHASE_ROLES and not comp.running:
            self._new_phase(comp)
            if comp.engaged and self.prefetch:
                self._prefetch_after(comp)  # a component that stayed loaded still starts the next one's copy
        if comp.engaged:
            return
        self._engage(comp)

    def _new_phase(self, comp: ComponentState) -> None:
        # A few times per request (encode, denoise, decode), never per block: memory cached for the previous
        # phase's activations is given back so that the next phase's differently shaped activations reuse it
        # instead of growing reserved memory beside it (the VAE decode after the DiT, above all).
        if self.phase_leader is not None:
            self.next_leader[self.phase_leader.name] = comp.name
        self.phase, self.phase_leader = comp.role, comp
        upcoming = self._expected_next_leader(comp)
        for other in self.components:
            if other.role == comp.role or other.role not in _PHASE_ROLES or other.running:
                continue
            # Under an explicit budget the plan counts a component's swapped part and streaming slots only in
            # its own phase: the VAE decode's workspace takes the room the DiT's swapped blocks and slots had.
            # Otherwise a component leaves now only when it would be evicted before its next use anyway (the DiT
            # during the decode, when the text encoder starts the next request): the decode gets its room and
            # the encoder's prefetch can overlap the decode. A DiT whose next use follows the decode stays.
            if self.explicit_budget or (upcoming is not None and other in self.conflicts(upcoming)):
                self.evict(other)
        self.mover.trim_cache()

    def _expected_next_leader(self, comp: ComponentState) -> ComponentState | None:
        """The component expected to start the phase after ``comp``'s: the one that did last time, else the
        next component of another role in the pipeline's order."""
        name = self.next_leader.get(comp.name)
        if name is not None:
            return self.by_name[name]
        if comp.name not in self.order:
            return None
        index = self.order.index(comp.name)
        for step in range(1, len(self.order)):
            candidate = self.by_name[self.order[(index + step) % len(self.order)]]
            if candidate.role != comp.role and candidate.role in _PHASE_ROLES:
                return candidate
        return None

    def _engage(self, comp: ComponentState) -> None:
        if self.learning:
            if comp.name not in self.order:
                self.order.append(comp.name)
            elif comp.name != self.order[-1]:
                self.learning = False  # a component runs again after others: one request's order is known
        evicted = self._evict_conflicts(comp)
        if comp.swap is not None and not comp.swap.on_device:
            comp.check_unchanged()  # once per load, not per call
            evicted |= self._make_room(comp, comp.swap_bytes + comp.stream_bytes)
            if evicted:
                self.mover.trim_cache(0)  # the evicted memory goes back before the next allocation
            self._onload(comp)
        if comp.swap is not None:
            self.mover.wait_head(comp.swap)  # a staged DiT's blocks each wait for their own part
        if comp.streamer is not None:
            comp.streamer.start()
        comp.engaged = True
        if self.prefetch:
            self._prefetch_after(comp)

    # -- placement decisions ------------------------------------------------------------------------------
    def conflicts(self, comp: ComponentState) -> list[ComponentState]:
        if comp.role == "dit":
            return [c for c in self.components if c is not comp and c.role in ("dit", "encoder")]
        if comp.role == "encoder":
            return [c for c in self.components if c.role == "dit"]
        return []

    def _evict_conflicts(self, comp: ComponentState) -> bool:
        evicted = False
        for other in self.conflicts(comp):
            if other.running:
                logger.debug("%s runs inside %s; not evicting it", comp.name, other.name)
                continue
            evicted |= self.evict(other)
        return evicted

    def _make_room(self, comp: ComponentState, need: int) -> bool:
        if self.budget is None:
            return False
        candidates = sorted(
            (c for c in self.components if c is not comp and not c.running and self._device_bytes(c)),
            key=lambda c: c.last_used,
        )
        evicted = False
        while self.loaded_bytes() + need > self.budget and candidates:
            evicted |= self.evict(candidates.pop(0))
        return evicted

    def loaded_bytes(self) -> int:
        """Weight bytes on the device now (resident parts, loaded swap parts and streaming slots)."""
        total = 0
        for c in self.components:
            if c.resident is not None:
                total += c.resident.nbytes
            total += self._device_bytes(c)
        return total

    def _device_bytes(self, c: ComponentState) -> int:
        total = c.swap_bytes if c.swap is not None and c.swap.on_device else 0
        if c.streamer is not None and c.streamer.active:
            total += c.streamer.slot_bytes
        return total

    def evict(self, comp: ComponentState) -> bool:
        """Drop ``comp``'s swapped and streamed device copies (zero bytes move)."""
        changed = False
        if comp.swap is not None and comp.swap.on_device:
            self.mover.drop(comp.swap)
            changed = True
        if comp.streamer is not None and comp.streamer.active:
            comp.streamer.stop()
            changed = True
        comp.engaged = False
        if changed:
            self._note("evict", comp.name)
        return changed

    def _onload(self, comp: ComponentState) -> None:
        self.mover.onload_async(comp.swap)
        self.mover.counters.swaps += 1
        self._note("load", comp.name)

    def _prefetch_after(self, comp: ComponentState) -> None:
        if comp.name not in self.order or self.learning and self.order[-1] == comp.name:
            return
        index = self.order.index(comp.name)
        nxt = self.by_name[self.order[(index + 1) % len(self.order)]]
        if nxt.role != comp.role:  # the next phase: whoever started it last time (the DiT, given embeddings)
            nxt = self._expected_next_leader(comp) or nxt
        if nxt is comp or nxt.swap is None or nxt.swap.on_device:
            return
        if not self.explicit_budget and any(c.loaded and c.swap is not None for c in self.conflicts(nxt)):
            # Without an explicit budget the mode's promise holds: exclusive groups never share the device.
            return
        if self.budget is not None and self.loaded_bytes() + nxt.swap_bytes + nxt.stream_bytes > self.budget:
            return
        self.mover.onload_async(nxt.swap)
        self.mover.counters.swaps += 1
        self._note("prefetch", nxt.name)

    def _note(self, event: str, name: str) -> None:
        if self.keep_trace:
            self.trace.append((event, name))
