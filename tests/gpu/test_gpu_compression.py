"""On a CUDA device with nvCOMP: compressed transfers give outputs bitwise equal to the resident run."""

from __future__ import annotations

import time

import pytest
import torch

import vramferry
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, assert_runs_equal, run
from vramferry.api import apply
from vramferry.discovery.inventory import inventory_of
from vramferry.discovery.roles import discover
from vramferry.planning.planner import plan
from vramferry.runtime.probe import device_profile

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_nvcomp():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("nvidia.nvcomp", reason="needs nvCOMP (pip install 'vramferry[compress]')")


def _budget_that_streams(pipe) -> int:
    """A budget under which auto must move part of the DiT: the resident plan's peak on this device (its
    allocator settings included) less half its weights."""
    inventory = inventory_of(discover(pipe))
    device = device_profile(torch.device("cuda"))
    full = plan(inventory, vramferry.OffloadConfig(mode="none"), device=device)
    dit = max((c for c in inventory.components if c.role == "dit"), key=lambda c: c.bytes)
    return full.predicted_peak_bytes - dit.bytes // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["flux", "wan"])
@pytest.mark.parametrize("mode", ["model", "layerwise", "auto"])
def test_compressed_output_bitwise_equal_to_resident(name, mode, dtype):
    pipe, kwargs = DIFFUSERS_PIPELINES[name]()
    pipe.to("cuda", dtype)
    expected = run(pipe, kwargs)
    budget = _budget_that_streams(pipe) if mode == "auto" else None
    config = vramferry.OffloadConfig(mode=mode, compression="lossless", vram_budget=budget, verify=True)
    handle = apply(pipe, config)
    try:
        assert any(c.codec == "lossless" for c in handle.plan.components)
        assert_runs_equal(pipe, kwargs, expected)
        stats = handle.stats()
        assert 0 < stats.host_compressed_bytes < stats.host_compressed_raw_bytes
        assert stats.bytes_decoded > 0 and stats.bytes_d2h == 0
    finally:
        handle.remove()
    assert all(p.device.type == "cuda" and p.dtype == dtype for p in pipe.transformer.parameters())
    assert_runs_equal(pipe, kwargs, expected)


def _bf16_weights(nbytes: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(0)
    return (torch.randn(nbytes // 2, generator=g, device="cuda") * 0.02).to(torch.bfloat16)


def test_ans_round_trip_and_ratio_on_bf16_weights():
    from vramferry.runtime.codecs import NvcompAns

    codec = NvcompAns(torch.device("cuda"))
    raw = _bf16_weights(64 << 20).view(torch.uint8).cpu()
    encoded = codec.encode(raw)
    assert encoded.ratio < 0.72  # ~0.685 measured on an H200
    out = torch.empty_like(raw)
    encoded.decode_into(out)
    assert torch.equal(out, raw)


def test_decode_is_queued_without_a_host_synchronisation():
    """The hot path never waits on the host: queueing a decode behind 200 ms of GPU work returns at once."""
    from vramferry.runtime.codecs import NvcompAns

    codec = NvcompAns(torch.device("cuda"))
    raw = _bf16_weights(32 << 20).view(torch.uint8).cpu()
    encoded = codec.encode(raw)
    assert len(encoded.chunks) == 1
    staged = encoded.payload.cuda()
    out = torch.empty(raw.numel(), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    codec.decode_on(staged, out, stream)  # warm: the codec's first use may allocate and synchronise
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(400_000_000)  # ~200 ms of GPU time on the decode stream
    t = time.perf_counter()
    keep = codec.decode_on(staged, out, stream)
    issued = time.perf_counter() - t
    torch.cuda.synchronize()
    del keep
    assert torch.equal(out.cpu(), raw)
    assert issued < 0.05, f"queueing a decode took {issued * 1e3:.0f} ms: it waited for the device"


def test_the_compressed_cache_serves_the_gpu_codec(tmp_path):
    """``vramferry compress`` on the GPU writes nvCOMP entries; ``load`` reads them instead of compressing, with
    output bitwise equal to the resident run; a CPU codec's entries beside them change nothing."""
    from vramferry.pipelines.loading import load_pipeline

    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    pipe.to(torch.bfloat16).save_pretrained(tmp_path)
    resident = load_pipeline(tmp_path, dtype="bfloat16").to("cuda")  # the files' dtype, as the cache serves
    resident.set_progress_bar_config(disable=True)
    expected = run(resident, kwargs)
    del resident
    report = vramferry.compress(tmp_path, compression="lossless")
    assert report.codec == "nvcomp-ans" and report.written > 0 and report.compressed_bytes < report.raw_bytes
    pytest.importorskip("zstandard")
    assert vramferry.compress(tmp_path, compression="lossless", codec="zstd-planes").written == report.written
    config = vramferry.OffloadConfig(mode="layerwise", compression="lossless", verify=True)
    for cache, from_cache in (("auto", True), ("off", False)):
        with vramferry.load(tmp_path, config, dtype="bfloat16", compression_cache=cache) as handle:
            handle.pipeline.set_progress_bar_config(disable=True)
            assert_runs_equal(handle.pipeline, kwargs, expected)
            stats = handle.stats()
        assert (stats.compressed_from_cache > 0) is from_cache
        assert (stats.compressed_at_apply == 0) is from_cache
        assert stats.bytes_decoded > 0


def test_the_decode_speed_is_measured_on_the_device_and_planned_with():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    pipe.to("cuda", torch.bfloat16)
    config = vramferry.OffloadConfig(mode="layerwise", compression="lossless")
    with apply(pipe, config) as handle:
        speeds = handle.measurements.decode_bytes_per_s
        assert len(speeds) == 1
        measured = next(iter(speeds.values()))
        assert 10e9 < measured < 5e12  # bytes of output per second: tens to thousands of GB/s on a GPU
        assert handle.device_profile.decode_bytes_per_s == measured
        assert any(f"decode {measured / 1e9:.0f} GB/s" in note for note in handle.plan.notes)
