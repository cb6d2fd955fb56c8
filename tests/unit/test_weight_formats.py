"""Quantized tensors (tensor subclasses) and live LoRA adapters in every mode, on the CPU (adapters added, fused
or deleted while live: ``test_live_lora.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vramferry
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, run

MODES = ["model", "layerwise", "auto"]


def _cfg(mode: str) -> vramferry.OffloadConfig:
    return vramferry.OffloadConfig(mode=mode, onload_device="cpu", verify=True)


def _quantized(name: str):
    torchao = pytest.importorskip("torchao.quantization")
    pipe, kwargs = DIFFUSERS_PIPELINES[name]()
    torchao.quantize_(pipe.transformer, torchao.Int8WeightOnlyConfig())
    return pipe, kwargs


def _offloaded_twice(pipe, kwargs, mode: str):
    """Run ``pipe`` without offload, then twice offloaded (each output equal); returns the first output, the
    transformer's inventory entry and the formatted plan."""
    expected = run(pipe, kwargs)
    handle = vramferry.apply(pipe, _cfg(mode))
    try:
        for _ in range(2):
            got = run(pipe, kwargs)
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key])
        shown = vramferry.planning.format_plan(handle.plan, handle.inventory)
        return expected, handle.inventory.get("transformer"), shown
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["flux", "wan"])
def test_int8_weight_only_transformer_gives_the_quantized_output_and_is_restored(name, mode):
    pipe, kwargs = _quantized(name)
    params = dict(pipe.transformer.named_parameters())
    kinds = {key: type(p) for key, p in params.items()}
    assert any(k.__name__ == "Int8Tensor" for k in kinds.values())
    expected, inventory, shown = _offloaded_twice(pipe, kwargs, mode)
    # The inventory counts the bytes that cross: int8 data and scales, not four bytes per element; the plan
    # shows how they are stored.
    quantized = sum(p.qdata.numel() for p in params.values() if hasattr(p, "qdata"))
    assert inventory.bytes < sum(p.numel() * 4 for p in params.values())
    assert inventory.bytes >= quantized
    assert inventory.formats == ("Int8Tensor",) and inventory.dtype == "torch.int8"
    assert "(Int8Tensor, int8)" in shown
    # remove() gives back the same parameter objects, of the same subclass.
    after = dict(pipe.transformer.named_parameters())
    assert all(after[key] is params[key] and type(after[key]) is kinds[key] for key in params)
    for key in expected:
        np.testing.assert_array_equal(run(pipe, kwargs)[key], expected[key])


@pytest.mark.parametrize("mode", MODES)
def test_lora_weights_switched_while_live_give_the_output_without_offload(mode):
    peft = pytest.importorskip("peft")
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    config = peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False
    )
    pipe.transformer.add_adapter(config, adapter_name="a")
    expected = {}
    for weight in (1.0, 0.5, 0.0):
        pipe.transformer.set_adapters(["a"], weights=[weight])
        expected[weight] = run(pipe, kwargs)
    pipe.transformer.disable_adapters()
    expected["off"] = run(pipe, kwargs)
    pipe.transformer.enable_adapters()
    handle = vramferry.apply(pipe, _cfg(mode))
    inference = []
    block = pipe.transformer.transformer_blocks[0]
    probe = block.register_forward_pre_hook(
        lambda m, a: inference.append(any(p.is_inference() for p in m.parameters()))
    )
    try:
        for weight in (1.0, 0.5, 0.0, 0.5):  # switched between requests, while the handle is live
            pipe.transformer.set_adapters(["a"], weights=[weight])
            with torch.inference_mode():  # as servers and benchmarks run requests
                got = run(pipe, kwargs)
            for key in got:
                np.testing.assert_array_equal(got[key], expected[weight][key])
        pipe.transformer.disable_adapters()
        got = run(pipe, kwargs)
        for key in got:
            np.testing.assert_array_equal(got[key], expected["off"][key])
        pipe.transformer.enable_adapters()
    finally:
        probe.remove()
        handle.remove()
    # Tensors bound by the runtime are never inference tensors, not even while a request runs in inference mode.
    assert inference and not any(inference)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["flux", "wan"])
def test_gguf_transformer_loaded_from_a_file_gives_the_quantized_output_and_is_restored(name, mode, tmp_path):
    pytest.importorskip("gguf")
    from pipelines.gguf_files import gguf_transformer

    pipe, kwargs = DIFFUSERS_PIPELINES[name]()
    pipe.transformer = gguf_transformer(pipe, tmp_path)
    params = dict(pipe.transformer.named_parameters())
    quantized = {key for key, p in params.items() if type(p).__name__ == "GGUFParameter"}
    assert quantized and all(params[key].dtype == torch.uint8 for key in quantized)
    expected, inventory, shown = _offloaded_twice(pipe, kwargs, mode)
    # The inventory counts the GGML blocks' bytes (about 1.06 bytes per quantized weight), not float32.
    tensors = [*params.values(), *pipe.transformer.buffers()]
    assert inventory.bytes == sum(t.numel() * t.element_size() for t in tensors)
    assert inventory.formats == ("GGUFParameter Q8_0",)
    assert "GGUFParameter Q8_0" in shown
    after = dict(pipe.transformer.named_parameters())
    assert all(after[key] is params[key] for key in params)
    assert {type(after[k]).__name__ for k in quantized} == {"GGUFParameter"}
    assert {after[k].quant_type.name for k in quantized} == {"Q8_0"}
    for key in expected:
        np.testing.assert_array_equal(run(pipe, kwargs)[key], expected[key])


@pytest.mark.parametrize("layer", ["Linear4bit", "Linear8bitLt"])
def test_bitsandbytes_layers_are_refused_at_apply_naming_the_weight_and_the_fix(layer):
    bnb = pytest.importorskip("bitsandbytes")
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    old = pipe.transformer.proj_out
    new = getattr(bnb.nn, layer)(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    pipe.transformer.proj_out = new.to("cpu")  # quantizes on the move, as bitsandbytes does
    before = {key: type(p) for key, p in pipe.transformer.named_parameters()}
    refused = r"transformer\.proj_out\.weight is a bitsandbytes .*torchao"
    with pytest.raises(vramferry.OffloadError, match=refused):
        vramferry.apply(pipe, _cfg("layerwise"))
    # Nothing was changed: the pipeline runs as before, and it can be offloaded once the layer is replaced.
    assert {key: type(p) for key, p in pipe.transformer.named_parameters()} == before
    run(pipe, kwargs)
    pipe.transformer.proj_out = old
    vramferry.apply(pipe, _cfg("layerwise")).remove()
