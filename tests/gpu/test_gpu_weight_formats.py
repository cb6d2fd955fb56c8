"""On a CUDA device: torchao fp8 tensors (weight-only and dynamic activations) and bitsandbytes layers (nf4, int8)
streamed in every mode give the output of the same quantized pipeline resident on the device."""

from __future__ import annotations

import pytest
import torch

import vramferry
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, assert_runs_equal, run

pytestmark = pytest.mark.gpu


def _fp8_configs() -> dict:
    quantization = pytest.importorskip("torchao.quantization")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensors need a CUDA device of compute capability 8.9 or newer")
    return {
        "weight_only": quantization.Float8WeightOnlyConfig(),
        "dynamic_activation": quantization.Float8DynamicActivationFloat8WeightConfig(),
    }


def _fp8_shaped(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


@pytest.mark.parametrize("mode", ["model", "layerwise", "auto"])
@pytest.mark.parametrize("variant", ["weight_only", "dynamic_activation"])
def test_fp8_transformer_streamed_gives_the_resident_quantized_output(variant, mode):
    config = _fp8_configs()[variant]
    from torchao.quantization import quantize_

    pipe, kwargs = DIFFUSERS_PIPELINES["flux_production"]()
    pipe.to(device="cuda", dtype=torch.bfloat16)
    # fp8 matmuls want both dimensions a multiple of 16; the tiny fixture's edge layers stay bf16.
    quantize_(pipe.transformer, config, filter_fn=_fp8_shaped)
    kinds = {type(p).__name__ for p in pipe.transformer.parameters()}
    assert any(k.startswith("Float8") for k in kinds), kinds
    expected = run(pipe, kwargs)
    handle = vramferry.apply(pipe, vramferry.OffloadConfig(mode=mode, verify=True))
    try:
        assert_runs_equal(pipe, kwargs, expected)
        entry = handle.inventory.get("transformer")
        assert any(f.startswith("Float8") for f in entry.formats), entry.formats
        # fp8 data crosses at one byte per element (plus scales): fewer bytes than bf16 everywhere.
        elements = sum(p.numel() for p in pipe.transformer.parameters())
        assert entry.bytes < 2 * elements
    finally:
        handle.remove()
    assert {type(p).__name__ for p in pipe.transformer.parameters()} == kinds
    assert all(p.device.type == "cuda" for p in pipe.transformer.parameters())


@pytest.mark.parametrize("mode", ["model", "layerwise", "auto"])
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_bitsandbytes_transformer_streamed_gives_the_resident_quantized_output(fmt, mode):
    pytest.importorskip("bitsandbytes")
    from pipelines.bnb_layers import quant_state_bytes, quantize_linears

    pipe, kwargs = DIFFUSERS_PIPELINES["flux_production"]()
    pipe.to(device="cuda", dtype=torch.float16 if fmt == "int8" else torch.bfloat16)
    assert quantize_linears(pipe.transformer, fmt, device="cuda") >= 20
    params = dict(pipe.transformer.named_parameters())
    expected = run(pipe, kwargs)
    state_bytes = quant_state_bytes(pipe.transformer)
    handle = vramferry.apply(pipe, vramferry.OffloadConfig(mode=mode, verify=True))
    try:
        assert_runs_equal(pipe, kwargs, expected)
        entry = handle.inventory.get("transformer")
        plain = sum(p.numel() * p.element_size() for p in params.values())
        assert entry.bytes == plain + state_bytes + sum(
            b.numel() * b.element_size() for b in pipe.transformer.buffers()
        )
    finally:
        handle.remove()
    after = dict(pipe.transformer.named_parameters())
    assert all(after[k] is params[k] and after[k].device.type == "cuda" for k in params)
    assert_runs_equal(pipe, kwargs, expected, times=1)
