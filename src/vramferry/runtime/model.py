"""Model-level offload: whole components swapped onto the device when they run.

The plan's schedule (:mod:`~vramferry.planning.schedule`) says, phase by phase, which components leave, load and
are prefetched; the scheduler here carries it out when the hooks report a component starting. Evicting drops the
device copy: the host copy is canonical, so nothing travels back. A DiT's load is staged: its blocks each wait
only for their own part of the copy, so its first call computes while the copy lands.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from torch import nn

from ..errors import OffloadError
from ..planning.schedule import Phase
from .pieces import Unit
from .repack import signature
from .transfer import Mover

logger = logging.getLogger(__name__)


_MODULE_CALL = nn.Module._call_impl.__code__


def _executing(ids: set[int]) -> bool:
    """Whether a module among ``ids`` is executing on this thread: a frame of PyTorch's module call for it is on
    the stack. Walked only when a decision depends on it (a phase change, an eviction), never per block."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _MODULE_CALL and id(frame.f_locals.get("self")) in ids:
            return True
        frame = frame.f_back
    return False


@dataclass(eq=False)
class ComponentState:
    """A component at run time.

    Attributes:
        residents: the parts that stay on the device while the plan holds: the non-block part and each resident
            block, one unit each (a re-placement adds or drops them one by one).
        swap: the part loaded when the component runs (may be None).
        streamer: the streamed blocks of a DiT (layerwise), or None.
        clock: measures a DiT's block times during its first calls, or None.
        running: how many of its entry modules are executing now (never evicted while > 0); see
            :meth:`running_now`.
        entries: ids of the modules whose hooks count ``running``.
        engaged: the component has run since its swap part was loaded (exclusion already applied).
        signature: the module's :func:`~vramferry.runtime.repack.signature` when its pieces were packed.
    """

    name: str
    role: str
    module: nn.Module
    residents: list[Unit] = field(default_factory=list)
    swap: Unit | None = None
    streamer: object | None = None
    clock: object | None = None  # a DiT's BlockClock (its blocks' measured compute times)
    running: int = 0
    entries: set[int] = field(default_factory=set)
    engaged: bool = False
    last_used: int = 0
    signature: tuple = ()

    def check_unchanged(self) -> None:
        """Raise if the module's tensors changed since its pieces were packed (an adapter added, deleted, fused or
        unfused, a layer replaced) and the change was not taken in: a pipeline call takes it in before it runs,
        but a component called on its own would run on weights the host store does not hold."""
        if signature(self.module) != self.signature:
            raise OffloadError(
                f"{self.name}: its tensors changed while the handle was live (an adapter added, deleted, fused or "
                "unfused, or a layer replaced) and it runs outside a pipeline call, which would have taken the "
                "change in first. Call handle.refresh() after the change, before calling the component."
            )

    def running_now(self) -> bool:
        """Whether one of its entry modules is executing now. A ``BaseException`` (Ctrl-C) raised inside a forward
        skips PyTorch's post hooks, so the count can be stale: it is trusted only while a call of one of the entry
        modules is on this thread's stack, and reset otherwise."""
        if self.running <= 0:
            return False
        if _executing(self.entries):
            return True
        logger.debug("%s: resetting a running count left by an interrupted call", self.name)
        self.running = 0
        if self.streamer is not None:
            self.streamer.clear_running()
        return False

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
    """Carries out a plan's schedule: at each phase's start and each component's start, the evictions, the load
    and the prefetches the plan lists. It takes no placement decision of its own.

    A phase that begins out of the plan's order skips the phases before it (a request that returns latents
    skips the decode; one given prompt embeddings skips the encoders): the skipped phases' evictions apply as
    well, so the device holds what the plan expects, and what they would have prefetched loads synchronously.
    Each such phase is counted in ``unplanned_phases``, with one warning that names ``OffloadConfig(order=...)``.

    Args:
        mover: issues the copies.
        components: every component.
        schedule: the plan's phases (:attr:`~vramferry.planning.Plan.schedule`).
    """

    def __init__(self, mover: Mover, components: list[ComponentState], schedule: tuple[Phase, ...]) -> None:
        self.mover = mover
        self.components = components
        self.by_name = {c.name: c for c in components}
        self.schedule = schedule
        self.phase_index = {phase.name: i for i, phase in enumerate(schedule)}
        self.step_of = {step.component: step for phase in schedule for step in phase.steps}
        self.phase_name = {step.component: phase.name for phase in schedule for step in phase.steps}
        self.current: int | None = None  # index of the running phase
        self.started: set[str] = set()  # components started in the current phase
        self.warned = False

    # -- the hot path -------------------------------------------------------------------------------------
    def activate(self, comp: ComponentState) -> None:
        """Make ``comp``'s weights usable by the next kernel on the compute stream."""
        phase = self.phase_name.get(comp.name)
        if phase is not None and self.phase_index[phase] != self.current and not comp.running_now():
            self._begin(self.phase_index[phase])
        if comp.name in self.started and comp.engaged:
            return
        self._start(comp)

    def _begin(self, index: int) -> None:
        # A few times per request (encode, denoise, decode), never per block: memory cached for the previous
        # phase's activations is given back so that the next phase's differently shaped activations reuse it
        # instead of growing reserved memory beside it (the VAE decode after the DiT, above all).
        phase = self.schedule[index]
        drop = list(phase.evict)
        if self.current is not None:
            expected = (self.current + 1) % len(self.schedule)
            if index != expected:
                # Phases were skipped (no VAE decode with latents returned, no encoders with prompt embeddings
                # passed in): their evictions apply too, so the device holds what the plan expects here; what
                # they would have prefetched loads synchronously when it runs.
                skipped = [
                    self.schedule[i % len(self.schedule)]
                    for i in range(expected, expected + len(self.schedule))
                ]
                skipped = skipped[: skipped.index(phase)]
                drop = [name for p in skipped for name in p.evict] + drop
                self._note_skipped(phase, skipped)
        self.current = index
        self.started = set()
        for name in phase.components:
            # A few times per request: the weights may have been changed between requests (adapters).
            self.by_name[name].check_unchanged()
        for name in dict.fromkeys(drop):
            other = self.by_name[name]
            if not other.running_now():
                self.evict(other)
        self.mover.trim_cache()

    def _note_skipped(self, phase: Phase, skipped: list[Phase]) -> None:
        self.mover.counters.unplanned_phases += 1
        if self.warned:
            return
        self.warned = True
        logger.warning(
            "vramferry: phase %r began with %s skipped: what the plan prefetches there loads synchronously. If "
            "requests always skip it (latents returned, prompt embeddings passed in), give the order they run in "
            "as OffloadConfig(order=...).",
            phase.name,
            " and ".join(repr(p.name) for p in skipped),
        )

    def _start(self, comp: ComponentState) -> None:
        step = self.step_of.get(comp.name) if comp.name in self.phase_name else None
        self.started.add(comp.name)
        evicted = False
        for name in step.evict if step is not None else ():
            other = self.by_name[name]
            if other.running_now():
                logger.debug("%s runs inside %s; not evicting it", comp.name, other.name)
                continue
            evicted |= self.evict(other)
        if comp.swap is not None and not comp.swap.on_device:
            comp.check_unchanged()  # once per load, not per call
            if evicted:
                self.mover.trim_cache(0)  # the evicted memory goes back before the next allocation
            self._onload(comp)
        if comp.swap is not None:
            self.mover.wait_head(comp.swap)  # a staged DiT's blocks each wait for their own part
        if comp.streamer is not None:
            comp.streamer.start()
        comp.engaged = True
        for name in step.prefetch if step is not None else ():
            nxt = self.by_name[name]
            if nxt.swap is not None and not nxt.swap.on_device:
                self.mover.onload_async(nxt.swap)
                self.mover.counters.swaps += 1

    # -- placement --------------------------------------------------------------------------------------------
    def loaded_bytes(self) -> int:
        """Weight bytes on the device now (resident parts, loaded swap parts and streaming slots)."""
        total = 0
        for c in self.components:
            total += sum(unit.nbytes for unit in c.residents)
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
        return changed

    def _onload(self, comp: ComponentState) -> None:
        self.mover.onload_async(comp.swap)
        self.mover.counters.swaps += 1
