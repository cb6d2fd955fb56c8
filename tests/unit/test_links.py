"""Helper GPUs' links: how a streamed unit is split, the configuration, the cost model, and the errors on a machine
without the GPUs (the copies themselves run on a GPU: tests/gpu/test_gpu_links.py)."""

from __future__ import annotations

import itertools
import json

import pytest

import vramferry
from vramferry.cli_options import OFFLOAD_FLAGS
from vramferry.config import OffloadConfig
from vramferry.errors import DeviceError
from vramferry.planning.archs import ARCHS
from vramferry.planning.devices import PRESETS
from vramferry.planning.planner import plan
from vramferry.runtime.links import link_shares, split_ranges


@pytest.mark.parametrize(
    ("nbytes", "shares"),
    [(10_000_000, [1.0, 1.0]), (123_456_789, [55.0, 50.0, 30.0]), (4096, [1.0, 3.0]), (1 << 20, [2.0, 0.0, 1.0])],
)
def test_a_unit_is_split_into_consecutive_aligned_slices_in_proportion(nbytes, shares):
    ranges = split_ranges(nbytes, shares)
    assert len(ranges) == len(shares)
    assert ranges[0][0] == 0 and ranges[-1][1] == nbytes
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # consecutive: every byte exactly once
    assert all(lo <= hi for lo, hi in ranges)
    assert all(hi % 512 == 0 for _lo, hi in ranges[:-1])
    for (lo, hi), share in zip(ranges, shares, strict=True):
        assert abs((hi - lo) - nbytes * share / sum(shares)) <= 512 * len(shares)
    assert all(hi == lo for (lo, hi), share in zip(ranges, shares, strict=True) if share == 0)


def test_split_ranges_refuses_shares_that_carry_nothing():
    with pytest.raises(ValueError, match="positive share"):
        split_ranges(100, [0.0, 0.0])


def test_a_helper_that_is_the_device_itself_still_gets_a_share():
    assert link_shares(55e9, [(True, 50e9), (False, 0.0)]) == (55e9, 50e9, 55e9)


def test_helper_devices_are_validated_and_round_trip():
    config = OffloadConfig(helper_devices=["cuda:1", "cuda:2"])
    assert config.helper_devices == ("cuda:1", "cuda:2")
    assert OffloadConfig.from_dict(json.loads(config.to_json())) == config
    for bad, message in [("cuda:1", "not the string"), (["cpu"], "numbered CUDA"), (["cuda"], "numbered CUDA"),
                         (["cuda:1", "cuda:1"], "listed twice"), (["banana"], "not a device")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            OffloadConfig(helper_devices=bad)
    assert OFFLOAD_FLAGS["helper_devices"][0] == "--helper-devices"


def test_a_helper_link_halves_a_transfer_bound_layerwise_step_and_not_a_compressed_one():
    inventory = ARCHS["flux1-dev"].inventory()
    alone = plan(inventory, OffloadConfig(mode="layerwise"), device=PRESETS["h200"])
    helped = plan(inventory, OffloadConfig(mode="layerwise", helper_devices=("cuda:1",)), device=PRESETS["h200"])
    assert helped.predicted_step_s == pytest.approx(alone.predicted_step_s / 2, rel=0.1)
    assert any("links: raw streamed blocks cross at 110.0 GB/s" in note for note in helped.notes)
    assert any("not measured" in note for note in helped.notes)
    lossless = {"transformer": 0.69}
    squeezed = [
        plan(inventory, OffloadConfig(mode="layerwise", compression="lossless", helper_devices=h),
             device=PRESETS["h200"], compression_ratios=lossless)
        for h in ((), ("cuda:1",))
    ]  # fmt: skip
    assert squeezed[0].predicted_step_s == pytest.approx(squeezed[1].predicted_step_s)  # decoded: one link


def test_helpers_need_a_cuda_execution_device(tiny_flux):
    pipe, _kwargs = tiny_flux
    with pytest.raises(DeviceError, match="helper_devices.*onload_device is 'cpu'"):
        vramferry.apply(pipe, mode="layerwise", onload_device="cpu", helper_devices=("cuda:1",))
