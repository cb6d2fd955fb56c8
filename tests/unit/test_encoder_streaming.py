"""Text encoders streamed block by block: planned by ``auto`` when they do not fit whole, run on CPU end to end."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.custom import (
    CUSTOM_PIPELINES,
    StandardNamesPipeline,
    TinyBlock,
    TinyDiT,
    TinyTextEncoder,
    _kwargs,
)
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, assert_runs_equal, run
from vramferry.api import apply
from vramferry.config import OffloadConfig
from vramferry.discovery.inventory import inventory_of
from vramferry.discovery.modules import Component, PipelineModules, Role
from vramferry.discovery.roles import discover
from vramferry.errors import BudgetError, PlanError
from vramferry.planning.plan import Plan
from vramferry.planning.planner import Placement, plan
from vramferry.planning.workload import Workload

T = Placement.STREAMED
SMALL = Workload(height=32, width=32, steps=2, text_tokens=48)


# -- discovery -------------------------------------------------------------------------------------------------


class _Pipeline:
    """A pipeline found by the name scan: a tiny DiT and whatever encoder a test sets."""

    def __init__(self, text_encoder: nn.Module) -> None:
        self.transformer = TinyDiT(layers=2)
        self.text_encoder = text_encoder


class _DeclaredEncoder(TinyTextEncoder):
    _offload_block_attrs = ["layers"]


class _BrokenEncoder(TinyTextEncoder):
    _offload_block_attrs = ["blocks"]  # the list is called "layers"


def test_an_encoder_without_blocks_gets_no_entry_and_no_warning():
    result = discover(_Pipeline(nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32))), strict=True)
    assert result.encoder_blocks == {} and result.warnings == []
    assert result.blocks_of("text_encoder") is None and set(result.blocks) == {"transformer"}


def test_encoder_blocks_declared_on_the_class_or_found_by_structure():
    declared = discover(_Pipeline(_DeclaredEncoder(layers=3))).encoder_blocks["text_encoder"]
    assert (declared.attrs, declared.names, declared.found_by) == (
        ("layers",),
        ("layers.0", "layers.1", "layers.2"),
        "declared",
    )
    assert declared.dit == "text_encoder" and all(isinstance(b, TinyBlock) for b in declared.blocks)
    broken = discover(_Pipeline(_BrokenEncoder()))
    assert broken.encoder_blocks["text_encoder"].found_by == "heuristic"
    assert (
        "encoder 'text_encoder' declares _BrokenEncoder._offload_block_attrs = ['blocks']"
        in broken.warnings[0]
    )
    mllm = discover(CUSTOM_PIPELINES["omnigen2"]()[0]).encoder_blocks["mllm"]
    assert mllm.names == ("layers.0", "layers.1")


def test_blocks_of_finds_encoder_blocks_of_modules_assembled_by_hand():
    """The built-in architectures build ``PipelineModules`` from their declarations, without discovery."""
    found = PipelineModules(pipeline_class="Tiny", source="protocol")
    encoder = TinyTextEncoder(layers=3)
    found.encoders.append(Component("text_encoder", encoder, Role.ENCODER, "declared"))
    blockset = found.blocks_of("text_encoder")
    assert blockset.names == ("layers.0", "layers.1", "layers.2") and blockset.blocks[0] is encoder.layers[0]
    assert inventory_of(found).get("text_encoder").block_names == blockset.names
    assert found.blocks_of("vae") is None


# -- running ---------------------------------------------------------------------------------------------------


def _cfg(mode: str, **kw) -> OffloadConfig:
    return OffloadConfig(mode=mode, onload_device="cpu", verify=True, **kw)


def _streaming_plan(pipe, names: tuple[str, ...] | None = None) -> Plan:
    """Model-level placement, with every block of the named encoders (default: all with blocks) streamed."""
    modules = discover(pipe)
    inventory = inventory_of(modules)
    base = plan(inventory, OffloadConfig(mode="model"), workload=SMALL)
    names = tuple(modules.encoder_blocks) if names is None else names
    components = []
    for c in base.components:
        if c.name in names:
            n = len(modules.encoder_blocks[c.name].blocks)
            c = dataclasses.replace(c, placement=Placement.SWAPPED, blocks=(T,) * n, prefetch_depth=1)
        components.append(c)
    return dataclasses.replace(base, components=tuple(components))


def _streamers(handle) -> dict[str, int]:
    """Per component with a streamer, how many block units it streams."""
    counts: dict[str, int] = {}
    for unit in handle.units():
        if unit.kind == "block":
            counts[unit.component] = counts.get(unit.component, 0) + 1
    return counts


def test_flux_t5_streamed_block_by_block_equals_the_resident_run():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    expected = run(pipe, kwargs)
    the_plan = _streaming_plan(pipe, ("text_encoder_2",))
    assert the_plan.get("text_encoder_2").streamed_blocks == 2
    handle = apply(pipe, _cfg("model"), plan=the_plan)
    try:
        assert handle.plan is the_plan
        # Only T5 streams: the transformer is swapped whole in this plan.
        assert _streamers(handle) == {"text_encoder_2": 2}
        assert [u.name for u in handle.units() if u.kind == "block"] == [
            "text_encoder_2.encoder.block.0",
            "text_encoder_2.encoder.block.1",
        ]
        # the second request streams again after the DiT evicted the encoder
        assert_runs_equal(pipe, kwargs, expected)
        stats = handle.stats()
        assert stats.blocks_streamed > 0 and stats.bytes_d2h == 0
    finally:
        handle.remove()
    for key, value in run(pipe, kwargs).items():
        np.testing.assert_array_equal(value, expected[key])


@pytest.mark.parametrize("name", sorted(DIFFUSERS_PIPELINES))
def test_every_encoder_streamed_equals_the_resident_run(name):
    """CLIP, T5, UMT5, Gemma 3 and Qwen2.5-VL (whose vision blocks never run for a text prompt)."""
    pipe, kwargs = DIFFUSERS_PIPELINES[name]()
    expected = run(pipe, kwargs)
    the_plan = _streaming_plan(pipe)
    with apply(pipe, _cfg("model"), plan=the_plan) as handle:
        assert set(_streamers(handle)) == set(handle.modules.encoder_blocks) != set()
        assert_runs_equal(pipe, kwargs, expected)
        assert handle.stats().blocks_streamed > 0


class _WideEncoderPipeline(StandardNamesPipeline):
    """The standard-names pipeline with a deep text encoder: 12 blocks, most of its bytes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.text_encoder = TinyTextEncoder(layers=12)


def _least_budget(inventory, workload: Workload) -> int:
    """The smallest budget auto accepts (feasibility is monotone in the budget)."""
    low, high = 1, inventory.total_bytes + 2**30
    while high - low > 1:
        mid = (low + high) // 2
        try:
            plan(inventory, OffloadConfig(mode="auto", vram_budget=mid), workload=workload)
            high = mid
        except BudgetError:
            low = mid
    return high


def test_auto_streams_an_encoder_that_does_not_fit_whole():
    pipe, kwargs = _WideEncoderPipeline(), _kwargs()
    expected = pipe(**kwargs)
    modules = discover(pipe)
    assert modules.encoder_blocks["text_encoder"].names[-1] == "layers.11"
    inventory = inventory_of(modules)
    encoder = inventory.get("text_encoder")
    assert len(encoder.block_bytes) == 12 and encoder.rest_bytes < encoder.block_bytes[0] * 12 / 4
    budget = _least_budget(inventory, SMALL)
    # At the least budget the encoder phase binds, so the encoder must stream; model mode cannot fit.
    with pytest.raises(BudgetError, match="text-encoder phase"):
        plan(inventory, OffloadConfig(mode="model", vram_budget=budget), workload=SMALL)
    config = _cfg("auto", vram_budget=budget)
    with apply(pipe, config, workload=SMALL) as handle:
        planned = handle.plan.get("text_encoder")
        assert planned.streamed_blocks == 12 and planned.placement is Placement.SWAPPED
        assert handle.plan.predicted_peak_bytes <= budget
        assert _streamers(handle)["text_encoder"] == 12
        for _ in range(2):
            assert torch.equal(pipe(**kwargs), expected)
        assert handle.stats().blocks_streamed >= 12
    assert torch.equal(pipe(**kwargs), expected)


def test_a_plan_for_another_pipeline_is_refused():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    the_plan = _streaming_plan(pipe, ("text_encoder_2",))
    renamed = dataclasses.replace(
        the_plan,
        components=tuple(
            dataclasses.replace(c, name="text_encoder_3") if c.name == "text_encoder_2" else c
            for c in the_plan.components
        ),
    )
    with pytest.raises(PlanError, match=r"missing: text_encoder_2; unknown: text_encoder_3"):
        apply(pipe, _cfg("model"), plan=renamed)
    short = dataclasses.replace(
        the_plan,
        components=tuple(
            dataclasses.replace(c, blocks=(T,)) if c.name == "text_encoder_2" else c
            for c in the_plan.components
        ),
    )
    with pytest.raises(PlanError, match="1 blocks of text_encoder_2, but discovery found 2"):
        apply(pipe, _cfg("model"), plan=short)
    with pytest.raises(PlanError, match="either plan= or workload="):
        apply(pipe, _cfg("model"), plan=the_plan, workload=SMALL)
    with pytest.raises(PlanError, match="must be a vramferry Plan"):
        apply(pipe, _cfg("model"), plan={"components": []})
    # Nothing was left applied: the pipeline still runs resident and can be offloaded.
    apply(pipe, _cfg("model"), plan=the_plan).remove()
