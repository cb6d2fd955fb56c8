"""Re-placement between plans on the device alone: only what becomes resident is copied, the host store stays as
it is, and the output is that of a fresh apply with the new plan; plans are cached per shape."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import vramferry
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, run
from vramferry.api import apply
from vramferry.planning import Placement, Workload, plan
from vramferry.planning.planner import keep_placement

R, T = Placement.RESIDENT, Placement.STREAMED


def _cfg(mode: str, **kw) -> vramferry.OffloadConfig:
    return vramferry.OffloadConfig(mode=mode, onload_device="cpu", **kw)


def _with_blocks(base, name, blocks):
    """``base`` with the blocks of component ``name`` placed as ``blocks``."""
    components = tuple(
        dataclasses.replace(c, blocks=blocks, prefetch_depth=1 if T in blocks else 0) if c.name == name else c
        for c in base.components
    )
    return dataclasses.replace(base, components=components, schedule=())


@pytest.fixture
def flux_plans():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux_production"]()
    expected = run(pipe, kwargs)
    handle = apply(pipe, _cfg("layerwise"))
    streamed = handle.plan  # both transformer blocks streamed, its non-block part resident
    handle.remove()
    half = _with_blocks(streamed, "transformer", (R, T))
    return pipe, kwargs, expected, streamed, half


def _block_params(pipe, index):
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    return list(blocks[index].parameters())


def test_a_replacement_copies_exactly_the_blocks_that_become_resident(flux_plans):
    pipe, kwargs, expected, streamed, half = flux_plans
    handle = apply(pipe, _cfg("layerwise"), plan=streamed)
    try:
        run(pipe, kwargs)
        sizes = {u.name: u.nbytes for u in handle.units()}
        host = {id(p): p.data_ptr() for p in _block_params(pipe, 1)}  # stays streamed: its host copy is used
        handle.reset_stats()
        assert handle.replan(plan=half) is True
        # Only transformer_blocks.0 became resident: its bytes, and nothing else, were copied.
        assert handle.stats().bytes_h2d == sizes["transformer.transformer_blocks.0"]
        units = {u.name: u for u in handle.units()}
        assert units["transformer.transformer_blocks.0"].kind == "resident"
        assert units["transformer.transformer_blocks.0"].where == "device"
        assert units["transformer.single_transformer_blocks.0"].kind == "block"
        # The host store was not repacked: the streamed block's weights still live in the same host bytes.
        assert {id(p): p.data_ptr() for p in _block_params(pipe, 1)} == host
        got = run(pipe, kwargs)
        # Back: dropping a resident block moves no bytes.
        handle.reset_stats()
        assert handle.replan(plan=streamed) is True
        assert handle.stats().bytes_h2d == 0
        assert [u.where for u in handle.units() if u.kind == "block"] == ["host", "host"]
        back = run(pipe, kwargs)
    finally:
        handle.remove()
    # The same output as a fresh apply with each plan (and as the resident run).
    fresh = apply(pipe, _cfg("layerwise"), plan=half)
    try:
        fresh_half = run(pipe, kwargs)
    finally:
        fresh.remove()
    for key in expected:
        np.testing.assert_array_equal(got[key], fresh_half[key])
        np.testing.assert_array_equal(back[key], expected[key])


def test_plans_are_made_once_per_shape_and_reused():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux_production"]()
    handle = apply(pipe, _cfg("model"))
    try:
        small, large = Workload(height=64, width=64, steps=2), Workload(height=128, width=128, steps=2)
        prepared = handle.prepare([small, large])
        assert [w for w, _p in handle.plans()][-2:] == [small, large]
        handle.replan(large)
        assert handle.plan is prepared[1]
        handle.replan(small)
        assert handle.plan is prepared[0]  # the cached plan, not a new one
        handle.replan(large)
        assert handle.plan is prepared[1]
    finally:
        handle.remove()


def test_keeping_a_placement_is_a_rent_or_buy_choice():
    # It does not fit the new shape: switch.
    assert keep_placement(None, 1.0, 10.0, 0.0) is None
    # Cheaper or no worse than switching: keep, counting nothing lost.
    assert keep_placement(1.0, 1.0, 0.5, 0.0) == 0.0
    # Slower by 0.2 s a request, switching costs 0.5 s: keep twice, then switch on the third request.
    lost = 0.0
    decisions = []
    for _ in range(3):
        after = keep_placement(1.2, 1.0, 0.5, lost)
        decisions.append(after is not None)
        lost = after if after is not None else 0.0
    assert decisions == [True, True, False]


def test_the_planner_prices_a_kept_placement_for_another_shape():
    from vramferry.planning.archs import get_arch
    from vramferry.planning.planner import price, transition_bytes

    spec = get_arch("flux1-dev")
    inventory = spec.inventory()
    config = vramferry.OffloadConfig(mode="auto", vram_budget="16GiB")
    small, large = (plan(inventory, config, workload=Workload(height=s, width=s)) for s in (512, 1536))
    small_blocks = small.get("transformer").blocks.count(R)
    large_blocks = large.get("transformer").blocks.count(R)
    assert small_blocks > large_blocks  # larger activations leave fewer blocks resident
    # The larger shape's placement serves the smaller one (more streaming, same memory); not the reverse.
    kept = price(large, inventory, config, workload=Workload(height=512, width=512))
    assert kept is not None and kept.placements[0] == large.placements[0]
    assert kept.predicted_request_s >= small.predicted_request_s
    assert price(small, inventory, config, workload=Workload(height=1536, width=1536)) is None
    # Switching from the large shape's placement to the small one's copies what becomes resident.
    sizes = inventory.get("transformer").block_bytes
    became = [
        b
        for b, was, now in zip(
            sizes, large.get("transformer").blocks, small.get("transformer").blocks, strict=True
        )
        if now is R and was is not R
    ]
    # (other components may become resident too: the VAE, with the room the smaller shape leaves)
    assert transition_bytes(large, small, inventory) >= sum(became) > 0
    assert transition_bytes(small, small, inventory) == 0


def test_verify_watches_the_units_a_replacement_builds(flux_plans):
    # The swapped encoders get new units at a re-placement; verify=True must watch those, not the dropped ones,
    # or every read of an encoder weight would be reported as a read of an unloaded unit.
    pipe, kwargs, expected, streamed, half = flux_plans
    handle = apply(pipe, _cfg("layerwise", verify=True), plan=streamed)
    try:
        assert handle.replan(plan=half) is True
        got = run(pipe, kwargs)
    finally:
        handle.remove()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_plans_a_handle_re_places_to_leave_room_for_what_the_allocator_keeps_cached():
    from vramferry.planning.archs import get_arch
    from vramferry.planning.costmodel import REPLACED_SLACK_CAP, reserved_bytes
    from vramferry.planning.devices import profile_from

    inventory = get_arch("flux1-dev").inventory()
    config = vramferry.OffloadConfig(mode="auto", vram_budget="16GB")
    work = Workload(height=1024, width=1024)
    fresh_device = dataclasses.replace(profile_from("h200"), expandable_segments=True)
    fresh = plan(inventory, config, device=fresh_device, workload=work)
    switched = plan(inventory, config, device=dataclasses.replace(fresh_device, replacing=True), workload=work)
    assert switched.predicted_peak_bytes <= 16e9 and fresh.predicted_peak_bytes <= 16e9
    # Fewer weights stay resident, by about the extra cached memory, so that reserved memory keeps to the budget.
    resident = {p.name: p for p in fresh.components}
    kept_less = sum(
        size
        for c in switched.components
        for size, was, now in zip(
            inventory.get(c.name).block_bytes, resident[c.name].blocks, c.blocks, strict=False
        )
        if was is R and now is not R
    )
    assert kept_less >= REPLACED_SLACK_CAP - 0.015 * 16e9
    gib = 2**30
    assert reserved_bytes(12 * gib, True, True) - 12 * gib == REPLACED_SLACK_CAP
    assert reserved_bytes(12 * gib, True) - 12 * gib < REPLACED_SLACK_CAP
