"""Lossless compressed host copies on the CPU: the codec, the store, every mode, the planner and the CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import vramferry
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, run
from vramferry import OffloadConfig
from vramferry.api import apply
from vramferry.cli import main
from vramferry.config import Compression
from vramferry.discovery.inventory import inventory_of
from vramferry.discovery.roles import discover
from vramferry.errors import CodecUnavailable, OffloadError
from vramferry.planning.archs import get_arch
from vramferry.planning.costmodel import simulate_dit_calls
from vramferry.planning.devices import profile_from
from vramferry.planning.plan import plan_from_dict, plan_to_dict
from vramferry.planning.planner import plan
from vramferry.runtime.codecs import ZstdPlanes, encode_piece, estimated_ratio, select_codec

H200 = profile_from("h200")


def _weights(n: int = 1 << 18, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(dtype)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


# -- the codec -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_codec_round_trips_exactly(dtype):
    weights = _weights(dtype=dtype)
    # Special values too: NaN payloads, infinities, signed zeros, subnormals.
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40], dtype=torch.float32)
    weights[: len(specials)] = specials.to(dtype)
    raw = _raw(weights)
    codec = ZstdPlanes()
    encoded = codec.encode(raw)
    out = torch.empty_like(raw)
    encoded.decode_into(out)
    assert torch.equal(out, raw)
    assert encoded.nbytes == raw.numel()


def test_pieces_are_encoded_in_chunks_that_decode_exactly():
    raw = _raw(_weights(3 * 4096 + 1000))  # not a whole number of chunks
    encoded = encode_piece(ZstdPlanes(), [raw], chunk_bytes=4096)[0]
    assert [c.raw_len for c in encoded.chunks] == [4096] * 6 + [raw.numel() - 6 * 4096]
    assert encoded.chunks[-1].start + encoded.chunks[-1].length == encoded.payload.numel()
    out = torch.full_like(raw, 7)
    encoded.decode_into(out)
    assert torch.equal(out, raw)
    assert encoded.largest_chunk < 4096  # every chunk compressed


def test_cpu_codec_compresses_bf16_weights_like_an_entropy_coder():
    raw = _raw(_weights())
    encoded = ZstdPlanes().encode(raw)
    # The high plane (sign + 7 exponent bits) carries ~2.7 bits: the whole keeps ~0.7 of the bytes.
    assert 0.6 < encoded.ratio < 0.76
    estimate = estimated_ratio([_weights()])
    assert estimate is not None and abs(estimate - encoded.ratio) < 0.05


def test_estimated_ratio_needs_readable_weights():
    assert estimated_ratio([torch.empty(1024, dtype=torch.bfloat16, device="meta")]) is None
    noise = torch.randint(0, 2**15, (1 << 16,), dtype=torch.int16).view(torch.float16)
    assert estimated_ratio([noise]) > 0.95  # incompressible bytes are not promised a gain


def test_estimated_ratio_of_many_tensors_follows_their_bytes():
    # Far more words than the sample holds: windows spread over all the bytes, so a component whose bytes are
    # half noise is estimated between the two, as its codec compresses it.
    weights = [_weights(1 << 16, seed=i) for i in range(48)]
    noise = [torch.randint(0, 2**15, (1 << 16,), dtype=torch.int16).view(torch.bfloat16) for _ in range(48)]
    mixed = [t for pair in zip(weights, noise, strict=True) for t in pair]
    whole = ZstdPlanes().encode(_raw(torch.cat(mixed))).ratio
    estimate = estimated_ratio(mixed)
    assert estimated_ratio(weights) < estimate < estimated_ratio(noise)
    assert abs(estimate - whole) < 0.05


def test_codec_rejects_odd_or_typed_input():
    with pytest.raises(ValueError, match="even length"):
        ZstdPlanes().encode(torch.zeros(7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="flat uint8"):
        ZstdPlanes().encode(torch.zeros(8, dtype=torch.float16))


# -- the store and the schedule, every mode ------------------------------------------------------------------


def _budget_that_streams(pipe) -> int:
    """A budget under which auto must move part of the DiT: the resident plan's peak less half its weights."""
    inventory = inventory_of(discover(pipe))
    full = plan(inventory, OffloadConfig(mode="none"))
    dit = max((c for c in inventory.components if c.role == "dit"), key=lambda c: c.bytes)
    return full.predicted_peak_bytes - dit.bytes // 2


def _equal(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


@pytest.mark.parametrize("name", ["flux", "wan"])
@pytest.mark.parametrize("mode", ["model", "layerwise", "auto"])
def test_outputs_with_compression_equal_the_run_without_offload(name, mode):
    pipe, kwargs = DIFFUSERS_PIPELINES[name]()
    expected = run(pipe, kwargs)
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    budget = _budget_that_streams(pipe) if mode == "auto" else None
    config = OffloadConfig(mode=mode, onload_device="cpu", compression="lossless", vram_budget=budget)
    handle = apply(pipe, config)
    compressed = [c for c in handle.plan.components if c.codec == "lossless"]
    assert compressed, "a moved component must be compressed under compression='lossless'"
    for _ in range(2 if mode == "layerwise" else 1):  # twice: the ring of slots wraps into the next request
        _equal(run(pipe, kwargs), expected)
    stats = handle.stats()
    handle.remove()
    assert 0 < stats.host_compressed_bytes < stats.host_compressed_raw_bytes
    assert stats.bytes_decoded >= stats.host_compressed_raw_bytes / 2  # what ran was decoded on the way in
    # remove() gives every tensor back exactly, and the pipeline runs as before.
    after = pipe.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    _equal(run(pipe, kwargs), expected)


def test_host_memory_holds_only_compressed_bytes_of_moved_pieces():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    total = sum(p.numel() * p.element_size() for c in discover(pipe).components() for p in c.module.parameters())
    with apply(pipe, OffloadConfig(mode="layerwise", onload_device="cpu")) as raw_handle:
        raw = raw_handle.stats()
    with apply(pipe, OffloadConfig(mode="layerwise", onload_device="cpu", compression="lossless")) as handle:
        stats = handle.stats()
        # A streamed block's weights are not kept raw anywhere on the host while it is not loaded.
        block = pipe.transformer.transformer_blocks[0]
        weight = block.attn.to_q.weight
        assert weight.shape == (weight.shape[0], weight.shape[1]) and weight.untyped_storage().nbytes() < 64
        _equal(run(pipe, kwargs), run(pipe, kwargs))
    assert raw.host_pageable_bytes >= total * 0.99
    held = stats.host_pageable_bytes + stats.host_pinned_bytes
    saved = stats.host_compressed_raw_bytes - stats.host_compressed_bytes
    assert held == raw.host_pageable_bytes - saved
    assert held < raw.host_pageable_bytes


def test_buffers_stay_readable_between_loads():
    pipe, _kwargs = DIFFUSERS_PIPELINES["flux"]()
    ids = pipe.text_encoder.get_buffer("embeddings.position_ids")
    expected = ids.clone()
    with apply(pipe, OffloadConfig(mode="model", onload_device="cpu", compression="lossless")) as handle:
        assert handle.stats().host_compressed_bytes > 0
        # Pipeline code may read a buffer on the host while its component is not loaded: its piece stays raw.
        assert torch.equal(pipe.text_encoder.get_buffer("embeddings.position_ids"), expected)


def test_verify_sees_no_unloaded_reads_with_compression():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    expected = run(pipe, kwargs)
    config = OffloadConfig(mode="layerwise", onload_device="cpu", compression="lossless", verify=True)
    with apply(pipe, config):
        _equal(run(pipe, kwargs), expected)


def test_compression_off_and_cpu_auto_keep_everything_raw():
    pipe, _kwargs = DIFFUSERS_PIPELINES["flux"]()
    for value in ("off", "auto"):  # auto: a CPU execution device has no link to save
        with apply(pipe, OffloadConfig(mode="layerwise", onload_device="cpu", compression=value)) as handle:
            assert all(c.codec == "raw" for c in handle.plan.components)
            assert handle.stats().host_compressed_bytes == 0


def test_missing_codec_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setitem(sys.modules, "nvidia", None)
    pipe, _kwargs = DIFFUSERS_PIPELINES["flux"]()
    with pytest.raises(CodecUnavailable, match=r"pip install 'vramferry\[compress\]'") as err:
        apply(pipe, OffloadConfig(mode="layerwise", onload_device="cpu", compression="lossless"))
    assert isinstance(err.value, OffloadError)
    # Nothing was changed: the pipeline can be offloaded again once the choice is changed.
    with apply(pipe, OffloadConfig(mode="layerwise", onload_device="cpu", compression="off")):
        pass
    # auto on a GPU without nvCOMP: no codec, no ratios for the planner, and the reason kept for the info line.
    choice = select_codec(Compression.AUTO, torch.device("cuda"), discover(pipe))
    assert choice.codec is None and choice.ratios is None and "nvCOMP" in choice.missing


# -- config, planner, CLI ---------------------------------------------------------------------------------------


def test_config_compression_is_validated_and_round_trips():
    config = OffloadConfig(compression="lossless")
    assert config.compression is Compression.LOSSLESS
    assert OffloadConfig.from_json(config.to_json()) == config
    assert config.to_dict()["compression"] == "lossless"
    with pytest.raises(ValueError, match=r"compression: 'zip' is not one of auto, off, lossless"):
        OffloadConfig(compression="zip")


def test_compressed_streaming_beats_the_transfer_floor_when_copies_bind():
    # 20 blocks of 400 MB at 1 ms compute each: transfer-bound (7.3 ms of copy per block raw).
    blocks = [(400_000_000, 1e-3, True)] * 20
    raw = simulate_dit_calls(blocks, 0.0, 2, H200)[1]
    packed = simulate_dit_calls(blocks, 0.0, 2, H200, ratio=0.69)[1]
    floor = 20 * 400e6 / H200.h2d_bytes_per_s
    assert raw == pytest.approx(floor, rel=0.05)
    assert packed == pytest.approx(0.69 * floor, rel=0.05)
    # Compute-bound (50 ms per block): nothing to gain, the decode's contention only costs.
    slow = [(400_000_000, 50e-3, True)] * 20
    assert simulate_dit_calls(slow, 0.0, 2, H200, ratio=0.69)[1] >= simulate_dit_calls(slow, 0.0, 2, H200)[1]


def test_planner_compresses_flux_streaming_and_leaves_wan_at_81_frames_raw():
    flux = get_arch("flux1-dev")
    config = OffloadConfig(mode="layerwise")
    raw = plan(flux.inventory(), config, device=H200, workload=flux.with_workload())
    packed = plan(
        flux.inventory(), config.replace(compression="lossless"), device=H200, workload=flux.with_workload()
    )
    assert packed.get("transformer").codec == "lossless"
    assert packed.predicted_step_s <= 0.75 * raw.predicted_step_s
    assert any(n.startswith("compression: lossless, predicted step") for n in packed.notes)
    assert plan_from_dict(json.loads(json.dumps(plan_to_dict(packed)))) == packed
    # auto without a codec (no ratios given) plans exactly as before.
    assert plan(flux.inventory(), OffloadConfig(mode="layerwise"), device=H200, workload=flux.with_workload()) == raw
    # auto with a codec compresses Flux at 1024² (transfer-bound) ...
    auto = plan(flux.inventory(), config, device=H200, workload=flux.with_workload(), compression_ratios={})
    assert auto.get("transformer").codec == "lossless"
    # ... but not Wan at 81 frames, where streaming is already free.
    wan = get_arch("wan2.1-t2v-14b")
    kept = plan(wan.inventory(), config, device=H200, workload=wan.with_workload(), compression_ratios={})
    assert all(c.codec == "raw" for c in kept.components)
    assert any(n.startswith("compression: off, no predicted gain") for n in kept.notes)


class _Unread(dict):
    """Ratios that fail the test when looked at."""

    def __len__(self):
        raise AssertionError("the ratios were read")

    __iter__ = __getitem__ = __contains__ = __len__


def test_auto_with_every_weight_resident_never_samples_the_weights():
    flux = get_arch("flux1-dev")
    roomy = plan(flux.inventory(), OffloadConfig(), device=H200, workload=flux.with_workload(),
                 compression_ratios=_Unread())  # fmt: skip
    assert all(c.placement == "resident" and c.codec == "raw" for c in roomy.components)
    assert "compression: off, every weight stays resident" in roomy.notes
    with pytest.raises(AssertionError, match="ratios were read"):  # a plan that moves weights reads them
        plan(flux.inventory(), OffloadConfig(vram_budget="16GB"), device=H200, workload=flux.with_workload(),
             compression_ratios=_Unread())  # fmt: skip


def test_resident_pieces_are_never_compressed():
    flux = get_arch("flux1-dev")
    config = OffloadConfig(mode="none", compression="lossless")
    resident = plan(flux.inventory(), config, device=H200, workload=flux.with_workload())
    assert all(c.codec == "raw" for c in resident.components)


def test_cli_plan_prints_the_compression_choice_and_gain(capsys):
    code = main(["plan", "--arch", "flux1-dev", "--offload", "layerwise", "--gpu", "h200", "--compression", "lossless"])
    out = capsys.readouterr().out
    assert code == 0
    assert "moved lossless ×0.69" in out
    assert "compression: lossless, predicted step" in out and "x); ratios transformer 0.690" in out
    code = main(["plan", "--arch", "flux1-dev", "--offload", "layerwise", "--gpu", "h200", "--compression", "off"])
    out = capsys.readouterr().out
    assert code == 0 and "lossless" not in out


def test_public_names():
    assert vramferry.OffloadConfig(compression="off").compression is vramferry.Compression.OFF
    assert issubclass(vramferry.CodecUnavailable, vramferry.OffloadError)


def test_a_replan_keeps_the_codecs_the_host_store_was_packed_with():
    from vramferry.planning import Workload

    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    expected = run(pipe, kwargs)
    config = OffloadConfig(
        mode="auto", onload_device="cpu", compression="lossless", vram_budget=_budget_that_streams(pipe)
    )
    with apply(pipe, config) as handle:
        first = {c.name: c.codec for c in handle.plan.components}
        assert first["transformer"] == "lossless"
        dit_bytes = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
        packed = handle.stats().host_compressed_raw_bytes
        # The whole DiT is kept compressed, its resident pieces too: any later placement moves it compressed.
        assert packed >= dit_bytes
        handle.replan(Workload(height=16, width=16, steps=2))
        assert {c.name: c.codec for c in handle.plan.components} == first
        assert handle.stats().host_compressed_raw_bytes == packed  # nothing was packed again
        _equal(run(pipe, kwargs), expected)

    # A store packed raw stays raw: a later plan cannot price compressed moves the store has no bytes for.
    raw_plan = plan(inventory_of(discover(pipe)), config.replace(compression="off"))
    assert all(c.codec == "raw" for c in raw_plan.components)
    with apply(pipe, config, plan=raw_plan) as handle:
        handle.replan(Workload(height=16, width=16, steps=2))
        assert all(c.codec == "raw" for c in handle.plan.components)
        assert handle.stats().host_compressed_bytes == 0
        _equal(run(pipe, kwargs), expected)
