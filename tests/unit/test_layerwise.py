"""Layerwise streaming on CPU: ring order, look-ahead, skipped and out-of-order blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vramferry
from pipelines.custom import CUSTOM_PIPELINES
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, run
from vramferry.api import apply


def _layerwise(pipe, depth=2, **kw):
    cfg = vramferry.OffloadConfig(mode="layerwise", onload_device="cpu", prefetch_depth=depth, **kw)
    return apply(pipe, cfg)


def _block_units(handle, component):
    return [u for u in handle.units() if u.kind == "block" and u.component == component]


def _blocks(handle, component, module):
    """The streamed blocks of ``component`` (whose module is ``module``), in execution order."""
    return [module.get_submodule(u.name.partition(".")[2]) for u in _block_units(handle, component)]


def test_flux_streams_both_block_lists_in_order_and_wraps():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    handle = _layerwise(pipe, depth=1)
    units = _block_units(handle, "transformer")
    names = [u.name for u in units]
    assert names == ["transformer.transformer_blocks.0", "transformer.single_transformer_blocks.0"]
    run(pipe, kwargs)
    stats = handle.stats()
    # Every block was prefetched in ring order before it ran (none loaded on demand): each DiT call copied every
    # block once, and the ring wrapped ahead into a next call by at most its depth + 1 slots.
    assert stats.sync_loads == 0
    calls = len(units) * stats.dit_calls
    assert calls <= stats.blocks_streamed <= calls + 2
    handle.remove()


def test_wan_has_one_ring_per_expert():
    pipe, kwargs = DIFFUSERS_PIPELINES["wan"]()
    expected = run(pipe, kwargs)
    handle = _layerwise(pipe)
    got = run(pipe, kwargs)
    np.testing.assert_array_equal(got["frames"], expected["frames"])
    stats = handle.stats()
    handle.remove()
    experts = [_block_units(handle, name) for name in ("transformer", "transformer_2")]
    assert all(experts) and stats.sync_loads == 0
    # Each expert streams its own blocks, every call: the copies add up to both rings' bytes per call at least.
    assert stats.bytes_h2d >= min(sum(u.nbytes for u in units) for units in experts) * stats.dit_calls


def test_bagel_residents_stay_loaded_while_blocks_stream():
    pipe, kwargs = CUSTOM_PIPELINES["bagel"]()
    expected = pipe(**kwargs)
    handle = _layerwise(pipe)
    assert torch.equal(pipe(**kwargs), expected)
    placement = {u.name: u.where for u in handle.units()}
    residents = [c.name for c in handle.modules.resident]
    assert residents
    for name in residents:
        assert placement[f"{name}:resident"] == "device"
    handle.remove()


def _dit_pipeline():
    pipe, kwargs = CUSTOM_PIPELINES["omnigen2"]()
    return pipe, kwargs, pipe.transformer


def test_skipped_blocks_are_correct_and_counted():
    """A cache method that skips blocks: the ring restarts from the block that does run."""
    pipe, kwargs, dit = _dit_pipeline()
    handle = _layerwise(pipe, depth=1)
    blocks = _blocks(handle, "transformer", dit)
    x = torch.randn(1, 16, 32)
    reference = [b(x) for b in blocks]  # in order (loads as expected)
    sync_before = handle.stats().sync_loads
    # Run only every third block: each one was not prefetched (depth 1), so it is loaded on demand.
    for i in range(0, len(blocks), 3):
        assert torch.equal(blocks[i](x), reference[i])
    assert handle.stats().sync_loads > sync_before
    handle.remove()


def test_out_of_order_blocks_are_correct():
    pipe, kwargs, dit = _dit_pipeline()
    handle = _layerwise(pipe, depth=2)
    blocks = _blocks(handle, "transformer", dit)
    x = torch.randn(1, 16, 32)
    reference = [b(x) for b in blocks]
    loaded = []
    for i in reversed(range(len(blocks))):
        assert torch.equal(blocks[i](x), reference[i])
        loaded.append(sum(u.where == "device" for u in _block_units(handle, "transformer")))
    # Memory stays bounded by the slots: at most depth + 1 blocks are bound to the device at once.
    assert max(loaded) <= handle.plan.get("transformer").prefetch_depth + 1
    handle.remove()


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_slots_are_fixed_and_reused(depth):
    pipe, kwargs, dit = _dit_pipeline()
    handle = _layerwise(pipe, depth=depth)
    blocks = _blocks(handle, "transformer", dit)
    calls = []
    dit.register_forward_pre_hook(lambda m, a: calls.append(set()))
    # Registered after vramferry's hooks: the block's weights are bound to its slot when this runs.
    hooks = [
        b.register_forward_pre_hook(lambda m, a: calls[-1].add(next(m.parameters()).data_ptr()))
        for b in blocks
    ]
    pipe(**{**kwargs, "num_inference_steps": 3})
    for hook in hooks:
        hook.remove()
    # The weights of every block land in one of the same depth + 1 device buffers, call after call.
    assert len(calls) == 3 and calls[0] == calls[1] == calls[2]
    assert len(calls[0]) == min(depth, len(blocks) - 1) + 1
    handle.remove()


class _Big(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 64)

    def forward(self, x):
        return x + self.linear(x)


class _Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.zeros(64))

    def forward(self, x):
        return x + self.shift


class _TwoKindsDiT(torch.nn.Module):
    """Like Flux: big blocks, then small ones."""

    def __init__(self) -> None:
        super().__init__()
        self.big = torch.nn.ModuleList([_Big() for _ in range(3)])
        self.small = torch.nn.ModuleList([_Small() for _ in range(3)])

    def forward(self, x):
        for block in [*self.big, *self.small]:
            x = block(x)
        return x


class _Holder:
    def __init__(self) -> None:
        self.transformer = _TwoKindsDiT()


def test_slot_memory_never_exceeds_depth_plus_one_largest_blocks(monkeypatch):
    """At a change of block size the old slot is freed before the new one is allocated."""
    import weakref

    pipe = _Holder()
    x = torch.randn(2, 64)
    expected = pipe.transformer(x)
    cfg = vramferry.OffloadConfig(
        mode="layerwise", onload_device="cpu", prefetch_depth=1, block_attrs={"transformer": ("big", "small")}
    )
    handle = apply(pipe, cfg)
    sizes = {u.nbytes for u in _block_units(handle, "transformer")}
    assert len(sizes) == 2
    live, peak, empty = [], [0], torch.empty

    def tracking_empty(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        if kwargs.get("dtype") is torch.uint8 and args and args[0] in sizes:
            alive = sum(t.numel() for ref in live if (t := ref()) is not None)
            peak[0] = max(peak[0], alive + tensor.numel())
            live.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(torch, "empty", tracking_empty)
    for _ in range(3):
        assert torch.equal(pipe.transformer(x), expected)
    monkeypatch.undo()
    assert 0 < peak[0] <= 2 * max(sizes)
    handle.remove()
