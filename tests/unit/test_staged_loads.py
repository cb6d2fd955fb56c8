"""Staged loads of a swapped DiT: the copy is split at block boundaries so that its first call computes block
by block as the weights land. On the CPU the copies are synchronous; the layout and the checks are tested here,
the overlap on the GPU (tests/gpu)."""

from __future__ import annotations

import pytest

import vramferry
import vramferry.runtime.install
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, assert_runs_equal, run
from vramferry.api import apply
from vramferry.errors import OffloadError


def _model(**kw) -> vramferry.OffloadConfig:
    return vramferry.OffloadConfig(mode="model", onload_device="cpu", **kw)


def _dit_blocks(pipe) -> list:
    return list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)


@pytest.mark.parametrize("stage_bytes", [1, 2**40])
def test_stages_cover_the_unit_block_by_block_in_order(monkeypatch, stage_bytes):
    monkeypatch.setattr(vramferry.runtime.install, "STAGE_BYTES", stage_bytes)
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    handle = apply(pipe, _model())
    unit = handle._runtime.scheduler.by_name["transformer"].swap
    stages, head = unit.stages, unit.head_bytes
    other_units = [u for s in handle._runtime.states if s.name != "transformer" for u in (s.swap,) if u]
    handle.remove()
    blocks = _dit_blocks(pipe)
    # Every block in exactly one stage, in execution order; the stages tile [head, end) of the unit.
    assert [b for _end, group in stages for b in group] == blocks
    ends = [end for end, _group in stages]
    assert 0 < head < ends[0] and ends == sorted(ends) and ends[-1] == unit.nbytes
    # One block per stage when any size will do; all blocks in one stage when none reaches the minimum.
    assert len(stages) == (len(blocks) if stage_bytes == 1 else 1)
    # Only a DiT's swapped part is staged.
    assert other_units and all(not u.stages for u in other_units)


def test_staged_dit_gives_the_same_output(monkeypatch):
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    expected = run(pipe, kwargs)
    monkeypatch.setattr(vramferry.runtime.install, "STAGE_BYTES", 1)
    handle = apply(pipe, _model(verify=True))
    try:
        assert_runs_equal(pipe, kwargs, expected)
    finally:
        handle.remove()


def test_verify_catches_a_block_weight_used_before_its_stage(monkeypatch):
    """A DiT that reached into a block's submodules without calling the block would read weights whose part of
    the copy was not waited for; verify names it."""
    monkeypatch.setattr(vramferry.runtime.install, "STAGE_BYTES", 1)
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    handle = apply(pipe, _model(verify=True))
    try:
        run(pipe, kwargs)
        unit = handle._runtime.scheduler.by_name["transformer"].swap
        block = pipe.transformer.single_transformer_blocks[0]
        unit.stage_events[id(block)] = object()  # as right after a staged copy was issued on the GPU
        with pytest.raises(OffloadError, match="before its block's part"):
            block.norm(*_norm_inputs(block))
    finally:
        unit.stage_events.clear()
        handle.remove()


def _norm_inputs(block):
    import torch

    dim = block.norm.linear.in_features
    return torch.zeros(1, 2, dim), torch.zeros(1, dim)
