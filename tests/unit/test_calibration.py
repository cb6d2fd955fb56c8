"""Block times measured during the first DiT calls, kept per device and shape, and planned with."""

from __future__ import annotations

import pytest
import torch

import vramferry
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, run
from vramferry.api import apply
from vramferry.planning.calibrate import BlockTimes, Measurements, measured_block_times
from vramferry.planning.costmodel import estimated_block_times
from vramferry.planning.devices import PRESETS
from vramferry.planning.workload import Workload
from vramferry.runtime.blockclock import BlockClock
from vramferry.runtime.transfer import Mover

pytest.importorskip("diffusers")

H100 = PRESETS["h100"]


def _cfg(mode: str, **kw) -> vramferry.OffloadConfig:
    return vramferry.OffloadConfig(mode=mode, onload_device="cpu", **kw)


def _dit_calls(handle) -> int:
    return handle.stats().dit_calls


@pytest.mark.parametrize("mode", ["model", "layerwise"])
def test_block_times_are_measured_after_the_first_call(mode):
    pipe, kwargs = DIFFUSERS_PIPELINES["flux_production"]()
    handle = apply(pipe, _cfg(mode))
    try:
        n_blocks = len(handle.modules.blocks_of("transformer").blocks)
        assert n_blocks >= 2
        run(pipe, kwargs, num_inference_steps=2)  # 2 DiT calls: the first is skipped, one measured so far
        assert _dit_calls(handle) == 2
        assert handle.block_times() == {} and not handle.has_new_measurements
        run(pipe, kwargs, num_inference_steps=2)
        times = handle.block_times()["transformer"]
        assert times.calls == 2 and len(times.seconds) == n_blocks
        assert all(s > 0 for s in times.seconds)
        assert handle.has_new_measurements
        assert handle.stats().block_seconds["transformer"] == pytest.approx(sum(times.seconds), abs=1e-6)
        # Later calls do not change the measurement.
        run(pipe, kwargs, num_inference_steps=2)
        assert handle.block_times()["transformer"] == times
    finally:
        handle.remove()


def test_replan_uses_the_measured_times_and_says_so():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux_production"]()
    handle = apply(pipe, _cfg("model"))
    try:
        estimated = handle.plan.predicted_step_s
        assert not any("block compute" in n for n in handle.plan.notes)
        for _ in range(2):
            run(pipe, kwargs, num_inference_steps=2)
        measured = sum(handle.block_times()["transformer"].seconds)
        assert handle.replan() is False  # same placement in model mode: only the predictions change
        assert not handle.has_new_measurements
        assert any("transformer: block compute measured on cpu" in n for n in handle.plan.notes)
        # Tiny blocks on a CPU take microseconds; the estimate floors each block at the GPU launch time.
        assert handle.plan.predicted_step_s != estimated
        assert handle.plan.predicted_step_s >= measured
    finally:
        handle.remove()


def test_recorded_block_times_replace_the_estimate_when_replanning():
    pipe, _ = DIFFUSERS_PIPELINES["flux_production"]()
    work = Workload(height=64, width=64, steps=2)
    handle = apply(pipe, _cfg("auto"), workload=work)
    try:
        size = handle.inventory.get("transformer")
        before = handle.plan.predicted_step_s
        handle.measurements.record("cpu", size, work, BlockTimes((1.0,) * len(size.block_bytes), calls=2))
        assert handle.replan() is False
        # The step is now the measured blocks (1 s each) plus the small estimated rest.
        assert handle.plan.predicted_step_s == pytest.approx(1.0 * len(size.block_bytes), rel=0.05)
        assert handle.plan.predicted_step_s > before
        # Re-planned for another shape, the measurement is scaled rather than dropped.
        handle.replan(Workload(height=128, width=128, steps=2))
        assert any("scaled from the measurement at 64×64" in n for n in handle.plan.notes)
    finally:
        handle.remove()


def test_other_shapes_scale_the_nearest_measurement_by_the_cost_model():
    from vramferry.planning.archs import get_arch

    size = get_arch("flux1-dev").inventory().get("transformer")  # full size, on the meta device
    small, large = Workload(height=512, width=512), Workload(height=2048, width=2048)
    measured = Measurements()
    assert measured_block_times(measured, "cpu", size, small, H100) is None  # never measured
    seconds = tuple(0.01 * (i + 1) for i in range(len(size.block_bytes)))
    measured.record("cpu", size, small, BlockTimes(seconds, 2))
    exact, source = measured_block_times(measured, "cpu", size, small, H100)
    assert exact == seconds and source == "measured"
    assert measured_block_times(measured, "another gpu", size, small, H100) is None  # kept per device
    scaled, source = measured_block_times(measured, "cpu", size, large, H100)
    assert source == "scaled from the measurement at 512×512"
    now, then = estimated_block_times(size, large, H100), estimated_block_times(size, small, H100)
    ratio = [n / t for n, t in zip(now, then, strict=True)]
    assert scaled == pytest.approx([m * r for m, r in zip(seconds, ratio, strict=True)])
    assert all(r > 1 for r in ratio)  # more tokens, more compute
    # The nearest measured shape is the basis: a 1024² measurement serves 2048² rather than the 512² one.
    measured.record("cpu", size, Workload(height=1024, width=1024), BlockTimes(seconds, 2))
    assert (
        measured_block_times(measured, "cpu", size, large, H100)[1]
        == "scaled from the measurement at 1024×1024"
    )


def _clock(n: int = 3) -> BlockClock:
    return BlockClock(Mover(torch.device("cpu")), n, skip=1, calls=2)


def _call(clock: BlockClock, blocks, signature=("x",)) -> None:
    clock.call_started(signature)
    for i in blocks:
        clock.block_started(i)
        clock.block_ended(i)
    clock.call_ended()


def test_the_clock_measures_only_its_window():
    clock = _clock()
    _call(clock, range(3))
    assert not clock.measuring and clock.times(block=True) is None  # first call skipped
    _call(clock, range(3))
    assert not clock.finished and clock.times(block=True) is None
    _call(clock, range(3))
    assert clock.finished
    times = clock.times(block=True)
    assert times is not None and len(times.seconds) == 3
    _call(clock, range(3))  # after the window: nothing more is recorded
    assert clock.times(block=True) == times


def test_a_nested_call_counts_once():
    clock = _clock(1)
    for _ in range(3):
        clock.call_started(("x",))
        _call(clock, [0])  # the DiT calling itself (a wrapper's forward)
        clock.call_ended()
    assert clock.seen_calls == 3 and clock.times(block=True) is not None


def test_skipped_blocks_or_changing_shapes_give_no_measurement():
    clock = _clock()
    for _ in range(3):
        _call(clock, [0, 2])  # block 1 skipped (a cache method): its time is unknown
    assert clock.finished and clock.times(block=True) is None
    clock = _clock()
    _call(clock, range(3))
    _call(clock, range(3), signature=("a",))
    _call(clock, range(3), signature=("b",))
    assert clock.finished and clock.times(block=True) is None


def test_a_new_shape_is_measured_afresh_and_the_old_measurement_kept():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux_production"]()
    first, second = Workload(height=64, width=64, steps=2), Workload(height=128, width=128, steps=2)
    handle = apply(pipe, _cfg("model"), workload=first)
    try:
        size = handle.inventory.get("transformer")
        for _ in range(2):
            run(pipe, kwargs)
        assert handle.replan(second) is False  # model mode: the placement does not depend on the shape
        assert measured_block_times(handle.measurements, "cpu", size, first, H100)[1] == "measured"
        assert handle.block_times() == {}  # the clocks start again for the new shape
        assert measured_block_times(handle.measurements, "cpu", size, second, H100)[1].startswith("scaled")
        for _ in range(2):
            run(pipe, kwargs, height=128, width=128)
        assert "transformer" in handle.block_times()
        assert measured_block_times(handle.measurements, "cpu", size, second, H100)[1] == "measured"
    finally:
        handle.remove()


def test_a_measurement_at_another_shape_or_again_keeps_the_plans_planned_with_their_own_times():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux_production"]()
    shapes = {s: Workload(height=s, width=s, steps=2) for s in (64, 96, 128)}
    handle = apply(pipe, _cfg("model"), workload=shapes[64])
    try:
        for size in (64, 96):  # measure 64², then 96²
            handle.replan(shapes[size])
            for _ in range(2):
                run(pipe, kwargs, height=size, width=size)
        handle.replan(shapes[64])
        own = handle.plan
        assert any("block compute measured on cpu" in n for n in own.notes)
        handle.replan(shapes[128])  # 128² is measured now: the plans scaled from 96² change, 64²'s does not
        for _ in range(2):
            run(pipe, kwargs, height=128, width=128)
        handle.replan(shapes[96])
        handle.replan(shapes[64])
        assert handle.plan is own
        for _ in range(2):  # measured afresh at its next visit: its plan stays
            run(pipe, kwargs, height=64, width=64)
        handle.replan(shapes[96])
        handle.replan(shapes[64])
        assert handle.plan is own
        size = handle.inventory.get("transformer")
        assert measured_block_times(handle.measurements, "cpu", size, shapes[128], H100)[1] == "measured"
    finally:
        handle.remove()
