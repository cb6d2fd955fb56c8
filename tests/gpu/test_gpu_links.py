"""Helper GPUs' links on CUDA: streamed blocks split across links give the resident output bit for bit. With one GPU
the execution device stands in as its own helper (the same copies, staging and events, over one link)."""

from __future__ import annotations

import pytest
import torch

import vramferry
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, assert_runs_equal, run

pytestmark = pytest.mark.gpu


def _helpers() -> tuple[str, ...]:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    count = torch.cuda.device_count()
    return ("cuda:1",) if count > 1 else ("cuda:0",)


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_blocks_streamed_over_helper_links_give_the_resident_output(name):
    helpers = _helpers()
    pipe, kwargs = DIFFUSERS_PIPELINES[name]()
    pipe.to("cuda:0")
    expected = run(pipe, kwargs)
    config = vramferry.OffloadConfig(mode="layerwise", verify=True, onload_device="cuda:0", helper_devices=helpers)
    handle = vramferry.apply(pipe, config)
    try:
        handle.reset_stats()
        assert_runs_equal(pipe, kwargs, expected)
        stats = handle.stats()
        assert stats.blocks_streamed > 0, "nothing was streamed: the helpers carried nothing"
        assert len(stats.link_bytes) == 2 and all(b > 0 for b in stats.link_bytes)
    finally:
        handle.remove()
    assert all(p.device == torch.device("cuda:0") for p in pipe.transformer.parameters())


def test_a_helper_that_does_not_exist_is_named():
    _helpers()
    pipe, _kwargs = DIFFUSERS_PIPELINES["flux"]()
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(vramferry.errors.DeviceError, match=f"{missing} does not exist"):
        vramferry.apply(pipe, vramferry.OffloadConfig(mode="layerwise", helper_devices=(missing,)))
