"""Staged loads of a swapped DiT: the copy is split at block boundaries so that its first call computes block
by block as the weights land. On the CPU the copies are synchronous; the layout and the checks are tested here,
the overlap on the GPU (tests/gpu)."""

from __future__ import annotations

import pytest

import vramferry
import vramferry.runtime.install
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, assert_runs_equal, run
from vramferry.api import apply
from vramferry.runtime.pieces import Unit


def _model(**kw) -> vramferry.OffloadConfig:
    return vramferry.OffloadConfig(mode="model", onload_device="cpu", **kw)


def _dit_blocks(pipe) -> list:
    return list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)


@pytest.mark.parametrize("stage_bytes", [1, 2**40])
def test_stages_cover_the_unit_block_by_block_in_order(monkeypatch, stage_bytes):
    monkeypatch.setattr(vramferry.runtime.install, "STAGE_BYTES", stage_bytes)
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    handle = apply(pipe, _model())
    units = {u.name: u for u in handle.units()}
    handle.remove()
    blocks = _dit_blocks(pipe)
    # One block per stage when any size will do; all blocks in one stage when none reaches the minimum.
    assert units["transformer:swap"].stages == (len(blocks) if stage_bytes == 1 else 1)
    # Only a DiT's swapped part is staged.
    others = [u for name, u in units.items() if name != "transformer:swap"]
    assert others and all(u.stages == 0 for u in others)


def test_stages_tile_the_unit_block_by_block_in_order():
    import torch

    from vramferry.runtime.refs import collect_refs

    pipe, _kwargs = DIFFUSERS_PIPELINES["flux"]()
    blocks = _dit_blocks(pipe)
    claimed: dict = {}
    head, _ = collect_refs(pipe.transformer, {id(b) for b in blocks}, claimed)
    per_block = [(b, collect_refs(b, set(), claimed)[0]) for b in blocks]
    unit = Unit("transformer:swap", head + [r for _b, refs in per_block for r in refs])
    unit.set_stages(per_block, min_bytes=1)
    # Every block in exactly one stage, in execution order; the stages tile [head, end) of the unit.
    assert [b for _end, group in unit.stages for b in group] == blocks
    ends = [end for end, _group in unit.stages]
    assert 0 < unit.head_bytes < ends[0] and ends == sorted(ends) and ends[-1] == unit.nbytes
    assert unit.nbytes >= sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    assert torch.is_tensor(head[0].current())


def test_staged_dit_gives_the_same_output(monkeypatch):
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    expected = run(pipe, kwargs)
    monkeypatch.setattr(vramferry.runtime.install, "STAGE_BYTES", 1)
    handle = apply(pipe, _model(verify=True))
    try:
        assert_runs_equal(pipe, kwargs, expected)
    finally:
        handle.remove()
