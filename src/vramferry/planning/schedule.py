"""The schedule: what the runtime loads, prefetches and evicts in every phase of a request. Pure.

A request runs its components in the request order (discovery's, or ``OffloadConfig.order``); consecutive
components of one phase (:mod:`~vramferry.planning.policy`) form a phase: the encoders, each DiT, the VAEs. The
phases repeat request after request, so the schedule is a cycle. It is found by playing the rules below over
two requests from an empty device and keeping the second (the steady state):

- **A phase begins**: with a ``vram_budget`` given, the swapped parts and streaming slots of the other phases'
  components (of other roles) leave: the plan counted them in their own phase only. Without one, only those
  that the next phase's first component excludes: the DiT leaves before the decode when the encoders start the
  next request, and stays when the request order has no encoders (prompt embeddings passed in).
- **A component starts**: the components its role excludes leave; if its swapped part is not on the device,
  the least recently used others leave until it and its slots fit under the weight budget, and it loads.
- **Once it runs** the next component in the request order is prefetched: if it has a swapped part not on the
  device, it fits under the weight budget beside what is loaded, and (without a given budget) nothing it
  excludes is loaded.

Evicting drops device copies only: the host copy is canonical, nothing travels back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .policy import phase_of, policy


@dataclass(frozen=True)
class Step:
    """One component starting within its phase.

    Attributes:
        component: its name.
        evict: components dropped before it loads (those its role excludes, then room under the budget).
        load: its swapped part is loaded when it starts (it was not prefetched or kept).
        prefetch: components whose swapped parts are copied on the copy stream once it runs.
    """

    component: str
    evict: tuple[str, ...] = ()
    load: bool = False
    prefetch: tuple[str, ...] = ()


@dataclass(frozen=True)
class Phase:
    """One phase of a request.

    Attributes:
        name: ``"encoders"``, the DiT's name, ``"vaes"``.
        evict: components of other phases dropped when it begins.
        steps: its components in the order they start.
    """

    name: str
    evict: tuple[str, ...] = ()
    steps: tuple[Step, ...] = ()

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(step.component for step in self.steps)

    @property
    def loads(self) -> tuple[str, ...]:
        """Components whose swapped parts load when they start in this phase."""
        return tuple(step.component for step in self.steps if step.load)

    @property
    def prefetches(self) -> tuple[str, ...]:
        return tuple(name for step in self.steps for name in step.prefetch)

    @property
    def evicts(self) -> tuple[str, ...]:
        """Everything this phase drops: at its start and before each of its components."""
        names = list(self.evict)
        names += [name for step in self.steps for name in step.evict if name not in names]
        return tuple(names)


@dataclass(frozen=True)
class Movable:
    """What the schedule needs of a component: its role, and the bytes of its resident part, its swapped part
    and its streaming slots."""

    name: str
    role: str
    swap_bytes: int = 0
    slot_bytes: int = 0
    resident_bytes: int = 0


class _Device:
    """The device state while the rules are played: loaded swapped parts, active slots, last use."""

    def __init__(self, items: dict[str, Movable], budget: int | None) -> None:
        self.items, self.budget = items, budget
        self.loaded: set[str] = set()
        self.streaming: set[str] = set()
        self.last_used: dict[str, int] = {}
        self.clock = 0

    def bytes(self) -> int:
        """Weight bytes on the device: every resident part, the loaded swapped parts, the active slots."""
        resident = sum(item.resident_bytes for item in self.items.values())
        swapped = sum(self.items[n].swap_bytes for n in self.loaded)
        return resident + swapped + sum(self.items[n].slot_bytes for n in self.streaming)

    def holds(self, name: str) -> bool:
        return name in self.loaded or name in self.streaming

    def evict(self, name: str, into: list[str]) -> None:
        if self.holds(name):
            self.loaded.discard(name)
            self.streaming.discard(name)
            into.append(name)

    def fits(self, extra: int) -> bool:
        return self.budget is None or self.bytes() + extra <= self.budget


def _excluded_by(item: Movable, items: dict[str, Movable]) -> list[str]:
    excludes = policy(item.role).excludes
    return [n for n, other in items.items() if n != item.name and other.role in excludes]


def _phases(order: Sequence[str], items: dict[str, Movable]) -> list[tuple[str, list[str]]]:
    phases: list[tuple[str, list[str]]] = []
    for name in order:
        phase = phase_of(name, items[name].role)
        if phase is None:
            continue
        if phases and phases[-1][0] == phase:
            phases[-1][1].append(name)
        else:
            phases.append((phase, [name]))
    return phases


def build_schedule(
    items: Sequence[Movable],
    order: Sequence[str],
    *,
    weight_budget: int | None,
    prefetch: bool,
    exclusive: bool,
) -> tuple[Phase, ...]:
    """The steady-state schedule of one request (see the module docstring for the rules).

    Args:
        items: every component, with the bytes of its swapped part and its streaming slots.
        order: the request order; components of no phase (resident, other) are left out of it.
        weight_budget: device bytes the swapped parts and slots may take beside the resident weights; ``None``:
            no limit besides the exclusion rules.
        prefetch: prefetch the next component while the current one runs.
        exclusive: no ``vram_budget`` was given (:attr:`~vramferry.config.OffloadConfig.exclusive`).
    """
    by_name = {item.name: item for item in items}
    phases = _phases(order, by_name)
    if not phases:
        return ()
    sequence = [name for _phase, names in phases for name in names]
    state = _Device(by_name, weight_budget)
    result: list[Phase] = []
    for _request in range(2):  # the second request is the steady state
        result = []
        for index, (phase, names) in enumerate(phases):
            upcoming = by_name[phases[(index + 1) % len(phases)][1][0]]
            begin: list[str] = []
            role = by_name[names[0]].role
            for other in sequence:
                if (
                    by_name[other].role == role
                ):  # the same role: its exclusion applies when a component starts
                    continue
                if not exclusive or other in _excluded_by(upcoming, by_name):
                    state.evict(other, begin)
            steps = [_start(state, by_name[name], sequence, prefetch, exclusive) for name in names]
            result.append(Phase(phase, tuple(begin), tuple(steps)))
    return tuple(result)


def _start(state: _Device, item: Movable, sequence: list[str], prefetch: bool, exclusive: bool) -> Step:
    state.clock += 1
    state.last_used[item.name] = state.clock
    dropped: list[str] = []
    for other in _excluded_by(item, state.items):
        state.evict(other, dropped)
    load = bool(item.swap_bytes) and item.name not in state.loaded
    if load:
        need = item.swap_bytes + item.slot_bytes
        by_age = sorted(
            (n for n in state.items if n != item.name and state.holds(n)),
            key=lambda n: state.last_used.get(n, 0),
        )
        while not state.fits(need) and by_age:
            state.evict(by_age.pop(0), dropped)
    if item.swap_bytes:
        state.loaded.add(item.name)
    if item.slot_bytes:
        state.streaming.add(item.name)
    fetched: tuple[str, ...] = ()
    if prefetch and len(sequence) > 1:
        nxt = state.items[sequence[(sequence.index(item.name) + 1) % len(sequence)]]
        blocked = exclusive and any(n in state.loaded for n in _excluded_by(nxt, state.items))
        if (
            nxt.name != item.name
            and nxt.swap_bytes
            and nxt.name not in state.loaded
            and not blocked
            and state.fits(nxt.swap_bytes + nxt.slot_bytes)
        ):
            state.loaded.add(nxt.name)
            fetched = (nxt.name,)
    return Step(item.name, tuple(dropped), load, fetched)
