"""Regionally compiled blocks (``block.compile()``, as diffusers' ``compile_repeated_blocks`` does) before or after
``apply``, in every mode: the offload hooks stay outside the compiled regions (``fullgraph=True`` would raise on a
graph break), nothing recompiles after the first request, the hooks still move the weights, and the output is the
compiled run's without offload. The ``eager`` backend keeps it fast on the CPU; inductor's numerics are checked on
the GPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import vramferry
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, run
from vramferry.planning import Placement

MODES = ["model", "layerwise", "auto"]


def _blocks(pipe):
    return [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]


def _compile(pipe) -> None:
    for block in _blocks(pipe):
        block.compile(backend="eager", fullgraph=True)


def _apply(pipe, mode: str):
    """Offload ``pipe``; in auto mode with a mixed placement (one DiT block resident, one streamed), which an
    unlimited CPU budget would not choose."""
    config = vramferry.OffloadConfig(mode=mode, onload_device="cpu", verify=True)
    if mode != "auto":
        return vramferry.apply(pipe, config)
    handle = vramferry.apply(pipe, config.replace(mode="layerwise"))
    base = handle.plan
    handle.remove()
    mixed = (Placement.RESIDENT, Placement.STREAMED)
    components = tuple(
        dataclasses.replace(c, blocks=mixed, prefetch_depth=1) if c.name == "transformer" else c
        for c in base.components
    )
    return vramferry.apply(pipe, config, plan=dataclasses.replace(base, components=components, schedule=()))


def _eager_bytes(mode: str) -> int:
    """Weight bytes one request moves with eager blocks (the compiled run must move the same)."""
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    handle = _apply(pipe, mode)
    try:
        run(pipe, kwargs)
        handle.reset_stats()
        run(pipe, kwargs)
        return handle.stats().bytes_h2d
    finally:
        handle.remove()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("mode", MODES)
def test_compiled_blocks_give_the_compiled_output_without_recompiling(mode, when):
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    _compile(pipe)
    expected = run(pipe, kwargs)
    if when == "after":
        for block in _blocks(pipe):
            block._compiled_call_impl = None  # eager again until compiled on top of the hooks
    handle = _apply(pipe, mode)
    try:
        if when == "after":
            _compile(pipe)
        got = run(pipe, kwargs)  # may compile (the hooks are new to dynamo)
        handle.reset_stats()
        with torch.compiler.set_stance("fail_on_recompile"):
            again = run(pipe, kwargs)
        moved = handle.stats().bytes_h2d
    finally:
        handle.remove()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
        np.testing.assert_array_equal(again[key], expected[key])
    # The hooks ran around the compiled blocks: the request moved what it moves with eager blocks.
    assert moved == _eager_bytes(mode) > 0


def test_the_planner_expects_compiled_blocks_to_compute_faster_until_measured():
    from vramferry.discovery.inventory import inventory_of
    from vramferry.discovery.roles import discover
    from vramferry.planning import Workload
    from vramferry.planning.archs import get_arch
    from vramferry.planning.costmodel import COMPILED_BLOCK_FACTOR, estimated_block_times
    from vramferry.planning.devices import profile_from

    pipe, _kwargs = DIFFUSERS_PIPELINES["flux"]()
    assert not inventory_of(discover(pipe)).get("transformer").compiled_blocks
    _compile(pipe)
    sizes = inventory_of(discover(pipe))
    assert sizes.get("transformer").compiled_blocks
    assert not sizes.get("text_encoder").compiled_blocks  # its layers were not compiled

    flux = get_arch("flux1-dev").inventory().get("transformer")
    device, work = profile_from("h200"), Workload(height=1024, width=1024)
    eager = estimated_block_times(flux, work, device)
    compiled = estimated_block_times(dataclasses.replace(flux, compiled_blocks=True), work, device)
    expected = [max(device.block_floor_s, COMPILED_BLOCK_FACTOR * e) for e in eager]
    assert compiled == pytest.approx(expected)
    assert sum(compiled) < sum(eager)
