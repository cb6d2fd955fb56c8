"""Turns a :class:`~vramferry.planning.Plan` into units, host arenas, device copies and hooks."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..discovery.bnb import kind_of, refusal
from ..discovery.modules import PipelineModules
from ..errors import OffloadError, PlanError
from ..planning.plan import Plan
from ..planning.planner import Placement
from ..planning.policy import policy
from ..units import format_bytes
from .cache import CompressedCache
from .codecs import Codec, Encoded
from .files import FileMap
from .fill import Filler, progress_bar
from .hooks import HookSet
from .layerwise import BlockStreamer
from .links import Links
from .model import ComponentState, SwapScheduler
from .pieces import Piece, TensorRef, Unit
from .refs import collect_refs
from .repack import Changes, bind_decoded, find_changes, signature
from .store import HostStore
from .transfer import Mover

logger = logging.getLogger(__name__)

#: A staged load's stages hold at least this many bytes (consecutive blocks merged): copies of this size run
#: at the link's full rate, and there are at most a few dozen events per load.
STAGE_BYTES = 64 * 2**20


class Runtime:
    """The live state behind an :class:`~vramferry.api.OffloadHandle`.

    The host store is packed once, in pieces (each component's non-block part and each of its blocks) that do
    not depend on the plan. A plan groups pieces into units: one per resident piece, one swapped part per
    component, one per streamed block. :meth:`transition` moves to another plan on the device alone;
    :meth:`repack` packs again the pieces whose tensors the user changed (:func:`~vramferry.runtime.repack.find_changes`).
    """

    def __init__(
        self,
        modules: PipelineModules,
        plan: Plan,
        *,
        device: torch.device,
        pin: bool,
        pin_limit: int | None,
        verify: bool,
        codec: Codec | None = None,
        cache: CompressedCache | None = None,
        progress: bool | None = None,
        links: Links | None = None,
        share_dir: str | None = None,
    ) -> None:
        self.modules = modules
        self.device = device
        self.mover = Mover(device, links=links)
        self.store = HostStore(
            pin=pin and device.type == "cuda",
            pin_limit=pin_limit,
            codec=codec,
            portable=links is not None,
            share_dir=share_dir,
        )
        self.hooks = HookSet()
        self.verify = verify
        self.pieces, shared = collect_pieces(modules)
        self.signatures = {c.name: signature(c.module) for c in modules.components()}
        encode = compressed_pieces(modules, self.pieces, plan) if codec is not None else set()
        start = time.perf_counter()
        early = self._pack(plan, shared, progress, encode, cache, mapped_pieces(modules, self.pieces, plan) - encode)
        self.pack_seconds = time.perf_counter() - start
        self.apply_seconds: dict[str, float] = {}
        self.shared: Unit | None = None
        self.shared_piece = shared if shared.refs else None
        if shared.refs:
            self.shared = Unit("shared", [])
            self.shared.set_runs([shared])
            self._load([self.shared])
        self.states: list[ComponentState] = []
        self._install(plan, early)
        for unit in early.values():
            self.mover.wait_ready(unit)
        self.loaded_while_filling = sum(unit.nbytes for unit in early.values())

    def _pack(
        self,
        plan: Plan,
        shared: Piece,
        progress: bool | None,
        encode: set[int],
        cache: CompressedCache | None,
        mapped: set[int],
    ) -> dict[int, Unit]:
        """Fill the host store, component by component (then the shared piece), with one bar. The pieces
        in ``encode`` are kept compressed: read from ``cache`` where its entries match them, else compressed now
        (with a bar of their own); those in ``mapped`` stay views of their checkpoint files where they are.

        On a GPU, the pieces ``plan`` keeps resident start copying to the device as soon as their arena is
        page-locked, while the next arena fills: a pipeline read from disk is on the device almost as soon as its
        last file is read. Returns those units, by piece (loading, not yet waited for)."""
        groups = [*self.pieces.items(), *([("shared", [shared])] if shared.refs else [])]
        early: dict[int, Unit] = {}
        resident = {
            id(piece)
            for name in self.pieces
            for piece, where in placed_pieces(self.pieces, plan, name)
            if where is Placement.RESIDENT and piece.refs
        }

        def upload(pieces: list[Piece]) -> None:
            # On the page-locking thread, once ``pieces`` are page-locked; the main thread meanwhile fills the
            # next arena and touches no unit or stream.
            for piece in pieces:
                if id(piece) in resident:
                    unit = self._resident_unit(piece)
                    self.mover.onload_async(unit, exact=True)
                    early[id(piece)] = unit

        held = upload if resident and self.device.type == "cuda" else None
        coded = [p for _name, pieces in groups for p in pieces if id(p) in encode and p.encodable]
        files = FileMap.current()
        cached: dict[int, Encoded] = {}
        filler = Filler(files)
        try:
            if cache is not None and coded and self.store.codec is not None:
                cached = cache.read(coded, files, filler.pool())
            total = sum(
                p.layout() for _name, pieces in groups for p in pieces if id(p) not in cached and id(p) not in mapped
            )
            bar = progress_bar(total, progress)
            filler.progress = bar.update if bar is not None else None
            try:
                with self.store.locker.in_background():
                    for name, pieces in groups:
                        self.store.pack(name, pieces, encode, filler, cached, mapped, held)
                    self.store.finish_packing(filler)
            except BaseException:
                for unit in early.values():  # a failed fill leaves every weight bound to its host copy
                    self.mover.drop(unit)
                raise
            finally:
                if bar is not None:
                    bar.close()
        finally:
            filler.close()
        self.filled = filler
        if self.store.unmappable_bytes:
            logger.info(
                "vramferry: %s that the plan leaves mapped in checkpoint files are not clean views of a file "
                "(weights in memory, or converted on loading): packed into the host store instead",
                format_bytes(self.store.unmappable_bytes),
            )
        if cache is not None and coded:
            cache.report(self.store.encoded_pieces)
        logger.info("vramferry: host store filled: %s", filler.summary())
        return early

    # -- units: per plan ------------------------------------------------------------------------------------
    def _install(self, plan: Plan, kept: dict[int, Unit]) -> list[Unit]:
        """Units, streamers, the scheduler and hooks for ``plan``; resident units in ``kept`` (by piece) are
        reused as they are. Returns the resident units that must still be loaded."""
        self.plan = plan
        self.states = []
        to_load: list[Unit] = []
        for component in self.modules.components():
            state = ComponentState(
                component.name, str(component.role), component.module, signature=self.signatures[component.name]
            )
            placed = placed_pieces(self.pieces, plan, component.name)
            for piece, where in placed:
                if where is Placement.RESIDENT and piece.refs:
                    unit = kept.get(id(piece))
                    if unit is None:
                        unit = self._resident_unit(piece)
                        to_load.append(unit)
                    state.residents.append(unit)
            swapped = [p for p, where in placed if where is Placement.SWAPPED and p.refs]
            if swapped:
                state.swap = self._unit(f"{component.name}:swap", swapped)
                if policy(state.role).staged:
                    # The DiT's first call after a load computes block by block as the copy lands.
                    state.swap.set_stages(
                        [(p.block, p.refs) for p in swapped if p.block is not None], STAGE_BYTES
                    )
            streamed = [self._unit(p.name, [p]) for p, where in placed if where is Placement.STREAMED]
            if streamed:
                depth = plan.get(component.name).prefetch_depth or 2
                state.streamer = BlockStreamer(
                    self.mover, component.name, streamed, depth, uniform=not plan.exclusive
                )
            self.states.append(state)
        self.scheduler = SwapScheduler(self.mover, self.states, plan.schedule)
        self._load(to_load)
        self._install_hooks()
        return to_load

    def _resident_unit(self, piece: Piece) -> Unit:
        return self._unit(piece.name.replace(":rest", ":resident"), [piece])

    def _unit(self, name: str, pieces: list[Piece]) -> Unit:
        unit = Unit(name, [])
        unit.set_runs(pieces)
        unit.extra["pieces"] = [id(p) for p in pieces]
        if len(pieces) == 1 and pieces[0].block is not None:
            unit.extra["module"] = pieces[0].block
        return unit

    def _load(self, units: list[Unit]) -> None:
        # One allocation per resident piece, of its exact size: rounded to whole segments, the pieces of a DiT
        # would take up to 2 MiB more each than the plan counts.
        for unit in units:
            self.mover.onload_async(unit, exact=True)
            self.mover.wait_ready(unit)

    def transition(self, plan: Plan) -> int:
        """Carry out ``plan`` instead of the current one, on the device alone: pieces that become resident are
        copied (on the copy stream, one copy each), those that stop are dropped, streaming slots and swapped
        parts are rebuilt; the host store is left as it is. Call it between requests. Returns the bytes copied.
        """
        self.hooks.remove()
        kept = self._teardown(plan)
        self.mover.trim_cache(0)  # what was dropped goes back before the new resident pieces are allocated
        loaded = self._install(plan, kept)
        return sum(unit.nbytes for unit in loaded)

    def _teardown(self, plan: Plan | None) -> dict[int, Unit]:
        """Drop the current plan's device copies (every tensor then points at its host copy), except the resident
        pieces that stay resident under ``plan`` (``None``: none stay). Returns those units, by piece."""
        kept: dict[int, Unit] = {}
        now_resident = {
            id(piece)
            for c in self.modules.components()
            for piece, where in (placed_pieces(self.pieces, plan, c.name) if plan is not None else ())
            if where is Placement.RESIDENT
        }
        for state in self.states:
            if state.streamer is not None:
                state.streamer.stop()
            if state.swap is not None and state.swap.on_device:
                self.mover.drop(state.swap)
            for unit in state.residents:
                pieces = unit.extra["pieces"]
                if len(pieces) == 1 and pieces[0] in now_resident:
                    kept[pieces[0]] = unit
                elif unit.on_device:
                    self.mover.drop(unit)
        return kept

    def changes(self) -> Changes | None:
        """What changed in the components' tensors since their pieces were packed; ``None``: nothing."""
        return find_changes(self.modules, self.pieces, self.shared_piece, self.signatures, collect_pieces)

    def repack(self, changes: Changes, plan: Plan | None) -> int:
        """Pack the new pieces of ``changes`` into the host store, release the ones they replace, and carry out
        ``plan`` (``None``: leave every weight bound to its host copy, for ``remove``). Call it between requests.
        Returns the raw bytes packed.

        Raises:
            OffloadError: adapters were fused into (or unfused from) compressed weights while they were not
                loaded: what the fuse read was a placeholder. Nothing was changed here.
        """
        for piece in changes.dead:
            if id(piece) in changes.fused and piece.encoded is not None and not self._loaded(piece):
                raise OffloadError(
                    f"{piece.name}: adapters were fused into or unfused from its weights while they were kept "
                    "compressed in host memory and not loaded, so the fuse read placeholders and its result is "
                    "lost. Load the pipeline again; fuse before apply, or apply with compression='off' to fuse "
                    "while live."
                )
        # Outside inference mode, whatever the caller runs in: the host copies made here are bound as weights.
        with torch.inference_mode(False):
            for piece in changes.dead:
                if piece.encoded is not None:
                    bind_decoded(piece)  # their bytes are read from here below, not from placeholders
            nbytes = changes.new_bytes
            if self.device.type != "cpu":
                # Tensors bound to device copies are read back from them (a fuse may have written them in place).
                self.mover.counters.bytes_d2h += sum(
                    ref.nbytes
                    for pieces in changes.new.values()
                    for piece in pieces
                    for ref in piece.refs
                    if ref.current().device.type == self.device.type
                )
            # A compressed component stays compressed (a later plan may move any of its pieces compressed).
            compressed = {p.component for p in changes.dead if p.encoded is not None}
            encode = {id(p) for name, pieces in changes.new.items() if name in compressed for p in pieces}
            filler = Filler(FileMap([]))  # the tensors' current values, never the checkpoint files' bytes
            try:
                for name, pieces in changes.new.items():
                    # Read from the tensors as they are bound now: a fuse may have changed a device copy in place.
                    self.store.pack(name, pieces, encode, filler)
                self.store.finish_packing(filler)
            finally:
                filler.close()
            self.hooks.remove()
            self.pieces = changes.pieces
            kept = self._teardown(plan)
            # Dropping the old units pointed their tensors back at the old host copies: point them at the new.
            for pieces in changes.new.values():
                for piece in pieces:
                    for ref in piece.refs:
                        ref.bind(ref.host)
            self.store.release(changes.dead)
            self.signatures.update(changes.signatures)
            self.mover.counters.repacked_bytes += nbytes
            self.mover.counters.repacked_pieces += sum(len(p) for p in changes.new.values())
            self.mover.trim_cache(0)
            if plan is not None:
                self._install(plan, kept)
        return nbytes

    def _loaded(self, piece: Piece) -> bool:
        """Whether a unit holding ``piece`` is on the device now."""
        return any(id(piece) in unit.extra.get("pieces", ()) and unit.on_device for unit in self.all_units())

    def all_units(self) -> list[Unit]:
        units = []
        for state in self.states:
            units.extend(state.residents)
            units.extend(u for u in (state.swap,) if u is not None)
            if state.streamer is not None:
                units.extend(state.streamer.units)
        if self.shared is not None:
            units.append(self.shared)
        return units

    def described_units(self) -> list[tuple[str, str, Unit]]:
        """Every unit as ``(component, kind, unit)``; kind is ``resident``, ``swap``, ``block`` or ``shared``."""
        found = []
        for state in self.states:
            found += [(state.name, "resident", u) for u in state.residents]
            found += [(state.name, "swap", state.swap)] if state.swap is not None else []
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

        # A module inside two components (an embedding shared by an encoder and the DiT) gets no entry hook:
        # running it for one must not start the other, and its tensors are in the shared unit, always loaded.
        seen: dict[int, int] = {}
        for state in self.states:
            for module in state.module.modules():
                seen[id(module)] = seen.get(id(module), 0) + 1
        self.shared_modules = {key for key, count in seen.items() if count > 1}
        for state in self.states:
            install_component_hooks(self, state)


def collect_pieces(modules: PipelineModules) -> tuple[dict[str, list[Piece]], Piece]:
    """Per component its non-block part, then its blocks in order; tensors reached from two pieces (tied weights
    across blocks or components) go to one shared piece, on the device whenever either runs."""
    claimed: dict[tuple, TensorRef] = {}
    owner: dict[int, Piece] = {}
    shared: dict[int, TensorRef] = {}
    found: dict[str, list[Piece]] = {}

    def piece(name: str, component: str, module: nn.Module, exclude: set[int], block=None) -> Piece:
        new, seen = collect_refs(module, exclude, claimed)
        made = Piece(name, component, new, block)
        owner.update((id(ref), made) for ref in new)
        shared.update((id(ref), ref) for ref in seen if owner[id(ref)] is not made)
        return made

    for component in modules.components():
        blockset = modules.blocks_of(component.name)  # a DiT's blocks, or an encoder's layers
        blocks = list(zip(blockset.names, blockset.blocks, strict=True)) if blockset is not None else []
        rest = piece(f"{component.name}:rest", component.name, component.module, {id(b) for _n, b in blocks})
        parts = [piece(f"{component.name}.{n}", component.name, b, set(), b) for n, b in blocks]
        found[component.name] = [rest, *parts]
    for pieces in found.values():
        for p in pieces:
            p.refs = [ref for ref in p.refs if id(ref) not in shared]
    return found, Piece("shared", "", list(shared.values()))


def placed_pieces(pieces: dict[str, list[Piece]], plan: Plan, name: str) -> list[tuple[Piece, Placement]]:
    """Each piece of component ``name`` with its placement under ``plan``."""
    cplan = plan.get(name)
    rest, *blocks = pieces[name]
    if cplan.blocks:
        if len(cplan.blocks) != len(blocks):
            raise PlanError(f"{name}: the plan places {len(cplan.blocks)} blocks but discovery found {len(blocks)}")
        return [(rest, cplan.placement), *zip(blocks, cplan.blocks, strict=True)]
    if cplan.placement is Placement.STREAMED:
        raise PlanError(f"{name}: only blocks can be streamed, and discovery found none in {name}")
    # A component kept whole: its blocks go where its placement says (one unit, packed contiguously).
    return [(p, cplan.placement) for p in (rest, *blocks)]


def mapped_pieces(modules: PipelineModules, pieces: dict[str, list[Piece]], plan: Plan) -> set[int]:
    """Ids of the pieces ``plan`` leaves mapped in their checkpoint files (:attr:`ComponentPlan.mapped`)."""
    found = set()
    for c in modules.components():
        flags = plan.get(c.name).mapped
        found.update(id(piece) for piece, m in zip(pieces[c.name], flags, strict=False) if m)
    return found


def mapped_flags(pieces: dict[str, list[Piece]]) -> dict[str, tuple[bool, ...]]:
    """Per component, which of its pieces the host store really left mapped."""
    return {name: tuple(p.mapped for p in found) for name, found in pieces.items() if any(p.mapped for p in found)}


def compressed_pieces(modules: PipelineModules, pieces: dict[str, list[Piece]], plan: Plan) -> set[int]:
    """Ids of the pieces ``plan`` compresses: every piece of the components whose codec is lossless, the ones
    it keeps resident too (decoded once as they load), so that a later plan for another request shape can move
    any of them compressed without repacking the host store."""
    return {
        id(piece) for c in modules.components() if plan.get(c.name).codec == "lossless" for piece in pieces[c.name]
    }


def check_weights_materialised(modules: PipelineModules, device: torch.device) -> None:
    """Raise if any weight is on the meta device (nothing to copy) or in a layout the host store cannot move for
    layers run on ``device`` (bitsandbytes parameters that are not quantized, or hold training weights)."""
    # bitsandbytes quantization state objects by id, with the weight holding each: binding points a state at one
    # weight's copy, so no two weights may share one.
    states: dict[int, tuple[torch.Tensor, str]] = {}
    for component in modules.components():
        for path, owner in component.module.named_modules():
            for name, tensor in [*owner._parameters.items(), *owner._buffers.items()]:
                if tensor is None:
                    continue
                if tensor.device.type == "meta":
                    raise OffloadError(
                        f"{_path(component.name, path, name)} is on the meta device; load the weights "
                        "(from_pretrained or to_empty + load_state_dict) before applying offload"
                    )
                kind = kind_of(tensor)
                why = refusal(tensor, owner, device) if kind is not None else None
                state = getattr(tensor, "quant_state", None) if kind is not None else None
                if why is None and state is not None:
                    other, where = states.setdefault(id(state), (tensor, _path(component.name, path, name)))
                    if other is not tensor:
                        why = f"shares its quant_state with {where}: give each weight a state of its own"
                if why is not None:
                    raise OffloadError(
                        f"{_path(component.name, path, name)} (a bitsandbytes {kind} in {type(owner).__name__} "
                        f"{_path(component.name, path)}) {why}; or quantize the component with torchao or load "
                        "a GGUF checkpoint, or run it without offload."
                    )


def _path(*names: str) -> str:
    return ".".join(n for n in names if n)
