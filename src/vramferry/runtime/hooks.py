"""Forward hooks that load weights before modules run, installed with PyTorch's removable hooks.

We never assign ``module.forward``: ``register_forward_pre_hook(..., with_kwargs=True)`` and
``register_forward_hook(..., always_call=True)`` keep signatures, ``torch.export`` and ``torch.compile`` intact,
and the post hook runs even when the forward raises, so the bookkeeping stays right after an exception (a
``BaseException`` skips it: :meth:`~vramferry.runtime.model.ComponentState.running_now` then corrects the count).
Every entry point is covered because hooks sit on the component's root and on every module below it that holds
tensors, at any depth, except inside its blocks (one hook per block covers what runs in it): ``vae.decode`` runs
``vae.decoder``, ``text_encoder.generate`` runs ``forward``, and ``text_encoder.get_input_embeddings()(ids)`` runs
a module three levels down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import OffloadError
from ..planning.policy import policy

if TYPE_CHECKING:
    from .model import ComponentState

_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


class Runtime(Protocol):
    """What the hooks use of the runtime that installs them (:class:`~vramferry.runtime.install.Runtime`)."""

    device: torch.device
    hooks: HookSet
    verify: bool
    shared_modules: set[int]
    modules: Any
    scheduler: Any
    mover: Any

    def units_by_module(self) -> dict[int, list]: ...


class HookSet:
    """The hooks one handle installed; ``remove()`` takes them all off."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []

    def add(self, module: nn.Module, pre, post=None) -> None:
        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if post is not None:
            self.handles.append(module.register_forward_hook(post, always_call=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def entry_modules(root: nn.Module, skip: set[int], leaves: set[int]) -> list[nn.Module]:
    """The root and every descendant that holds tensors, at any depth, except inside ``leaves`` (blocks: one
    hook each covers what runs inside them) and ``skip`` (streamed blocks, hooked on their own)."""
    found = [root]
    frontier = [root]
    while frontier:
        module = frontier.pop()
        for child in module.children():
            if id(child) in skip:
                continue
            if isinstance(child, _CONTAINERS):
                frontier.append(child)
                continue
            if _has_tensors(child):
                found.append(child)
                if id(child) not in leaves:
                    frontier.append(child)
    return found


def _to_device(value: Any, device: torch.device) -> tuple[Any, bool]:
    if isinstance(value, torch.Tensor):
        if value.device != device and value.device.type != "meta":
            return value.to(device, non_blocking=True), True
        return value, False
    if isinstance(value, (list, tuple)) and value and any(isinstance(v, torch.Tensor) for v in value):
        moved = [_to_device(v, device) for v in value]
        if any(changed for _v, changed in moved):
            return type(value)(v for v, _c in moved), True
    return value, False


def _move_inputs(args: tuple, kwargs: dict, device: torch.device):
    changed = False
    new_args = []
    for arg in args:
        arg, moved = _to_device(arg, device)
        changed |= moved
        new_args.append(arg)
    new_kwargs = {}
    for key, val in kwargs.items():
        val, moved = _to_device(val, device)
        changed |= moved
        new_kwargs[key] = val
    return (tuple(new_args), new_kwargs) if changed else None


def install_component_hooks(runtime: Runtime, state: ComponentState) -> None:
    """Entry hooks on ``state``'s module, block hooks on its streamed blocks, verify hooks if asked."""
    scheduler = runtime.scheduler
    device = runtime.device
    streamer = state.streamer
    block_units = streamer.units if streamer is not None else []
    skip = {id(u.extra["module"]) for u in block_units} | runtime.shared_modules

    @torch.compiler.disable
    def enter(module, args, kwargs):
        scheduler.activate(state)
        state.running += 1
        return _move_inputs(args, kwargs, device)

    @torch.compiler.disable
    def leave(module, args, output):
        state.running -= 1

    blockset = runtime.modules.blocks_of(state.name)
    leaves = {id(block) for block in blockset.blocks} if blockset is not None else set()
    for module in entry_modules(state.module, skip, leaves):
        runtime.hooks.add(module, enter, leave)
        state.entries.add(id(module))

    for unit in block_units:
        _install_block_hooks(runtime, state, unit)

    if policy(state.role).timed:
        # After the block hooks: a block's clock starts once its weights are ready.
        _install_timing_hooks(runtime, state)

    if runtime.verify:
        owners = runtime.units_by_module()
        staged = state.swap if state.swap is not None and state.swap.stages else None
        block_of = (
            {id(m): block for _end, blocks in staged.stages for block in blocks for m in block.modules()}
            if staged is not None
            else {}
        )
        for path, module in state.module.named_modules():
            units = owners.get(id(module), ())
            stage = (staged, block_of[id(module)]) if id(module) in block_of else None
            runtime.hooks.add(module, _verify_hook(f"{state.name}.{path}".rstrip("."), device, units, stage))


def _install_timing_hooks(runtime: Runtime, state: ComponentState) -> None:
    """Time each outermost forward of a DiT (registered after the entry hooks: the load is inside), and each
    of its blocks during the first calls (:class:`~vramferry.runtime.blockclock.BlockClock`). The same block hooks make
    a block of a staged swap unit wait for its stage of the copy first."""
    from .blockclock import BlockClock, call_signature

    mover = runtime.mover
    starts: list = []
    blockset = runtime.modules.blocks_of(state.name)
    clock = BlockClock(mover, len(blockset.blocks)) if blockset is not None and blockset.blocks else None
    state.clock = clock

    @torch.compiler.disable
    def start(module, args, kwargs):
        starts.append(mover.marker())
        if clock is not None and not clock.finished:
            clock.call_started(call_signature(args, kwargs))
        return None

    @torch.compiler.disable
    def end(module, args, output):
        if starts:
            mover.call_ended(starts.pop())
        if clock is not None and not clock.finished:
            clock.call_ended()

    runtime.hooks.add(state.module, start, end)
    if clock is None:
        return
    staged = state.swap if state.swap is not None and state.swap.stages else None
    for index, block in enumerate(blockset.blocks):
        runtime.hooks.add(block, *_block_hooks(clock, index, mover, staged))


def _block_hooks(clock, index: int, mover, staged):
    """A DiT block's pre and post hooks: wait for its stage of a staged load while one is pending (the first
    call after a load), then time it while its clock measures. Flag checks otherwise."""

    @torch.compiler.disable
    def block_start(module, args, kwargs):
        if staged is not None and staged.stage_events:
            mover.wait_stage(staged, module)
        if clock.measuring:
            clock.block_started(index)
        return None

    @torch.compiler.disable
    def block_end(module, args, output):
        if clock.measuring:
            clock.block_ended(index)

    return block_start, block_end


def _install_block_hooks(runtime: Runtime, state: ComponentState, unit) -> None:
    scheduler = runtime.scheduler
    streamer = state.streamer
    device = runtime.device

    @torch.compiler.disable
    def enter_block(module, args, kwargs):
        scheduler.activate(state)
        state.running += 1
        streamer.before_block(unit)
        return _move_inputs(args, kwargs, device)

    @torch.compiler.disable
    def leave_block(module, args, output):
        streamer.after_block(unit)
        state.running -= 1

    runtime.hooks.add(unit.extra["module"], enter_block, leave_block)
    state.entries.add(id(unit.extra["module"]))


def _verify_hook(path: str, device: torch.device, units, stage=None):
    # Not compiler-disabled, unlike the other hooks: verify hooks sit on every module, also inside compiled
    # blocks, where a disabled function would break the graph (an error under fullgraph=True). Traced there,
    # it checks nothing; the block's own entry runs outside the compiled region and is checked.
    def verify(module, args, kwargs):
        if torch.compiler.is_compiling():
            return None
        if stage is not None and id(stage[1]) in stage[0].stage_events:
            raise OffloadError(
                f"verify: {path} runs before its block's part of {stage[0].name} was waited for: the DiT uses "
                "the block's weights outside the block's forward. Report the pipeline layout; mode='layerwise' "
                "or a budget that keeps the DiT resident avoids staged loads."
            )
        for unit in units:
            if not unit.on_device:
                raise OffloadError(
                    f"verify: {path} runs while its weights ({unit.name}) are not loaded; it was reached without "
                    "passing an offload hook. Declare its component, or report the pipeline layout."
                )
        for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
            for name, tensor in tensors.items():
                if tensor is not None and tensor.device != device:
                    raise OffloadError(
                        f"verify: {kind} {path}.{name} is on {tensor.device} but {path} runs on {device}"
                    )
        return None

    return verify
