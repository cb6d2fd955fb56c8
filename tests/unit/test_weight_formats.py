"""Quantized weights (tensor subclasses, GGUF, bitsandbytes) and live LoRA adapters in every mode, on the CPU
(adapters added, fused or deleted while live: ``test_live_lora.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vramferry
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, run
from vramferry.discovery.inventory import inventory_of

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
    assert inventory.formats == ("Int8Tensor weight-only",) and inventory.dtype == "torch.int8"
    assert "(Int8Tensor weight-only, int8)" in shown
    # remove() gives back the same parameter objects, of the same subclass.
    after = dict(pipe.transformer.named_parameters())
    assert all(after[key] is params[key] and type(after[key]) is kinds[key] for key in params)
    for key in expected:
        np.testing.assert_array_equal(run(pipe, kwargs)[key], expected[key])


@pytest.mark.parametrize("mode", MODES)
def test_quantized_weights_are_held_by_the_host_store_alone(mode):
    # Binding a torchao parameter must replace its inner tensors too: kernels read ``weight.qdata``, and a
    # parameter still holding the originals would compute with them (and keep them in memory beside the store).
    import gc
    import weakref

    pipe, kwargs = _quantized("flux")
    expected = run(pipe, kwargs)
    originals = [weakref.ref(p.qdata) for p in pipe.transformer.parameters() if hasattr(p, "qdata")]
    assert originals
    handle = vramferry.apply(pipe, _cfg(mode))
    try:
        gc.collect()
        assert all(ref() is None for ref in originals), "a quantized parameter still holds its original data"
        got = run(pipe, kwargs)
    finally:
        handle.remove()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


@pytest.mark.parametrize("mode", ["model", "layerwise"])
def test_int8_weight_only_transformer_runs_inside_inference_mode(mode):
    # Servers call pipelines inside torch.inference_mode, where rebinding a torchao parameter's data fails.
    pipe, kwargs = _quantized("flux")
    expected = run(pipe, kwargs)
    handle = vramferry.apply(pipe, _cfg(mode))
    try:
        with torch.inference_mode():
            got = run(pipe, kwargs)
    finally:
        handle.remove()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    assert all(not p.is_inference() for p in pipe.transformer.parameters())


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


def _bnb_flux(fmt: str):
    """The tiny Flux pipeline with its transformer's linear layers in bitsandbytes format ``fmt``."""
    pytest.importorskip("bitsandbytes")
    from pipelines.bnb_layers import quantize_linears

    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    assert quantize_linears(pipe.transformer, fmt) >= 20
    return pipe, kwargs


def _unit_of(handle, block: str) -> str:
    """Where the unit holding the transformer's block ``block`` is bound now (``"device"`` or ``"host"``)."""
    units = {u.name: u for u in handle.units()}
    for name in (f"transformer.{block}", "transformer:swap", f"transformer.{block}:resident"):
        if name in units:
            return units[name].where
    raise AssertionError(f"no unit holds transformer.{block}: {sorted(units)}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", ["nf4", "nf4-plain", "fp4", "int8", "int8-ran"])
def test_bitsandbytes_transformer_gives_the_quantized_output_and_is_restored(fmt, mode):
    from pipelines.bnb_layers import quant_state_bytes, quant_tensors

    fmt, ran = fmt.removesuffix("-ran"), fmt.endswith("-ran")
    twin, kwargs = _bnb_flux(fmt)
    expected = run(twin, kwargs)  # the same quantized pipeline (the fixtures are seeded), never offloaded
    pipe, _kwargs = _bnb_flux(fmt)
    if ran:  # Linear8bitLt's first forward moved SCB from its weight into its MatmulLtState
        run(pipe, kwargs)
    transformer = pipe.transformer
    params = dict(transformer.named_parameters())
    quantized = {k: p for k, p in params.items() if type(p).__name__ in ("Params4bit", "Int8Params")}
    states = {k: p.quant_state for k, p in quantized.items() if fmt != "int8"}
    grads = {k: p.requires_grad for k, p in params.items()}
    plain = sum(p.numel() * p.element_size() for p in params.values()) + sum(
        b.numel() * b.element_size() for b in transformer.buffers()
    )
    state_bytes = quant_state_bytes(transformer)
    assert state_bytes > 0
    layer = transformer.transformer_blocks[0].attn.to_q
    seen = []

    def read(module, args):
        tensors = quant_tensors(module)
        seen.append(({t.untyped_storage().data_ptr() for t in tensors}, [t.is_inference() for t in tensors]))

    probe = layer.register_forward_pre_hook(read)
    budget = None
    if mode == "auto":  # a budget under which auto moves part of the DiT
        full = vramferry.planning.plan(inventory_of(vramferry.discover(pipe)), _cfg("none"))
        budget = full.predicted_peak_bytes - plain // 2
    config = vramferry.OffloadConfig(mode=mode, onload_device="cpu", verify=True, vram_budget=budget)
    handle = vramferry.apply(pipe, config)
    try:
        for _ in range(2):
            with torch.inference_mode():
                got = run(pipe, kwargs)
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key])
            # In its forward, the layer read its data and every state tensor from one buffer (its unit's device
            # copy), never an inference tensor; a unit dropped after the request is bound back to the host store.
            storages, inference = seen[-1]
            assert len(storages) == 1 and not any(inference)
            after = {t.untyped_storage().data_ptr() for t in quant_tensors(layer)}
            assert len(after) == 1
            if _unit_of(handle, "transformer_blocks.0") == "host":
                assert after != storages
        inventory = handle.inventory.get("transformer")
        shown = vramferry.planning.format_plan(handle.plan, handle.inventory)
        moved = [c for c in handle.plan.components if c.name == "transformer"][0]
    finally:
        probe.remove()
        handle.remove()
    if mode != "model":
        assert any(str(p) != "resident" for p in (moved.placement, *moved.blocks))
    # The inventory counts the bytes that cross: the packed data (uint8 or int8) and the quantization state.
    assert inventory.bytes == plain + state_bytes
    name = "Int8Params" if fmt == "int8" else f"Params4bit {fmt.split('-')[0]}"
    assert inventory.formats == (name,)
    assert f"({name}, " in shown
    # remove() gives back the same parameter objects, of the same type, with the same quantization state objects
    # holding tensors of their own on the CPU.
    after = dict(transformer.named_parameters())
    assert all(after[k] is params[k] and after[k].requires_grad == grads[k] for k in params)
    assert all(type(after[k]) is type(quantized[k]) for k in quantized)
    for key, state in states.items():
        assert after[key].quant_state is state and after[key].module.quant_state is state
    for module in transformer.modules():
        if type(getattr(module, "weight", None)).__name__ in ("Params4bit", "Int8Params"):
            assert all(t.device.type == "cpu" and not t.is_inference() for t in quant_tensors(module))
    for key in expected:
        np.testing.assert_array_equal(run(pipe, kwargs)[key], expected[key])


@pytest.mark.parametrize(
    "case",
    [
        ("Linear8bitLt", dict(has_fp16_weights=True), True, "holds training weights.*has_fp16_weights=False"),
        ("Linear4bit", dict(quant_type="nf4"), False, "is not quantized yet.*BitsAndBytesConfig"),
        ("Linear4bit", dict(quant_type="nf4"), True, "repacked for bitsandbytes' CPU kernel.*avx512bf16_for_cpu"),
    ],
    ids=["int8-training", "4bit-unquantized", "4bit-cpu-repack"],
)
def test_bitsandbytes_layouts_offload_cannot_move_are_refused_naming_the_layer_and_the_fix(case):
    bnb = pytest.importorskip("bitsandbytes")
    layer, options, quantize, refused = case
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    old = pipe.transformer.proj_out
    new = getattr(bnb.nn, layer)(old.in_features, old.out_features, bias=old.bias is not None, **options)
    new.load_state_dict(old.state_dict())
    if quantize:
        new = new.to("cpu")  # quantizes on the move, as bitsandbytes does
    if layer == "Linear4bit":
        new.support_avx512bf16_for_cpu = "repacked" in refused
    pipe.transformer.proj_out = new
    before = {key: type(p) for key, p in pipe.transformer.named_parameters()}
    named = rf"transformer\.proj_out\.weight \(a bitsandbytes .*{layer}.*{refused}"
    with pytest.raises(vramferry.OffloadError, match=named):
        vramferry.apply(pipe, _cfg("layerwise"))
    # Nothing was changed, and the pipeline can be offloaded once the layer is replaced.
    assert {key: type(p) for key, p in pipe.transformer.named_parameters()} == before
    pipe.transformer.proj_out = old
    vramferry.apply(pipe, _cfg("layerwise")).remove()


def test_bitsandbytes_weights_sharing_one_quant_state_are_refused():
    pipe, _kwargs = _bnb_flux("nf4")
    attn = pipe.transformer.transformer_blocks[0].attn
    attn.to_k.weight.quant_state = attn.to_q.weight.quant_state
    shared = r"attn\.to_k\.weight .*shares its quant_state with transformer\.transformer_blocks\.0\.attn\.to_q\.weight"
    with pytest.raises(vramferry.OffloadError, match=shared):
        vramferry.apply(pipe, _cfg("model"))
