"""Built-in full-size architectures on the meta device: sizes against the published models, speed, shape."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from vramferry.discovery.shapes import DitShape, VaeShape
from vramferry.planning.archs import ARCHS, get_arch

GB = 10**9


@pytest.fixture(scope="module", params=sorted(ARCHS))
def built(request):
    spec = ARCHS[request.param]
    start = time.perf_counter()
    pipe = spec.build()
    seconds = time.perf_counter() - start
    return spec, pipe, seconds


def test_building_is_fast_and_allocates_nothing(built):
    spec, pipe, seconds = built
    assert seconds < 20, f"{spec.name} took {seconds:.1f} s to build"
    for name, module in pipe.components.items():
        devices = {t.device.type for t in [*module.parameters(), *module.buffers()]}
        assert devices == {"meta"}, f"{spec.name}.{name} has tensors on {devices}"


def test_weights_are_bf16_with_the_loaders_fp32_exceptions(built):
    spec, pipe, _ = built
    for name, module in pipe.components.items():
        params = list(module.parameters())
        bf16 = sum(p.numel() for p in params if p.dtype == torch.bfloat16)
        assert bf16 / sum(p.numel() for p in params) > 0.99, f"{spec.name}.{name}"


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_flux_sizes():
    spec = get_arch("flux1-dev")
    inventory = spec.inventory()
    transformer = inventory.get("transformer")
    assert transformer.bytes == pytest.approx(23.8 * GB, rel=0.02)  # anchor_flux_h100.json: 23.8 GB
    assert len(transformer.block_bytes) == 19 + 38
    assert transformer.block_names[0] == "transformer_blocks.0"
    assert transformer.block_names[19] == "single_transformer_blocks.0"
    assert dataclasses.replace(transformer.shape, text_bytes=(), mod_bytes=()) == DitShape(3072)
    assert len(transformer.shape.text_bytes) == len(transformer.shape.mod_bytes) == 57
    assert inventory.get("text_encoder_2").bytes == pytest.approx(9.52 * GB, rel=0.01)  # T5-XXL 4.76 B params
    assert inventory.get("text_encoder").bytes == pytest.approx(0.246 * GB, rel=0.01)  # CLIP-L text, 123 M
    assert inventory.get("vae").bytes == pytest.approx(0.168 * GB, rel=0.02)  # 84 M, 16 latent channels
    assert inventory.get("vae").shape == VaeShape(128, 1, video=False)
    assert get_arch("qwen-image").inventory().get("vae").shape == VaeShape(96, 4, video=True)
    assert inventory.order == ("text_encoder", "text_encoder_2", "transformer", "vae")


def test_wan_sizes():
    spec = get_arch("wan2.1-t2v-14b")
    inventory = spec.inventory()
    transformer = inventory.get("transformer")
    assert transformer.bytes == pytest.approx(28.58 * GB, rel=0.02)  # anchor_wan_h100.json
    assert len(transformer.block_bytes) == 40 and len(set(transformer.block_bytes)) == 1
    assert transformer.shape.hidden_size == 5120 and transformer.shape.temporal_factor == 4
    assert inventory.get("text_encoder").bytes == pytest.approx(
        11.36 * GB, rel=0.01
    )  # UMT5-XXL encoder, 5.68 B
    assert inventory.get("vae").bytes == pytest.approx(0.254 * GB, rel=0.02)  # 127 M
    assert spec.workload.sequence_of(transformer.shape) == 32760  # 480×832, 81 frames


def test_wan22_has_two_experts_of_wan21s_size_that_exclude_each_other():
    from vramferry.config import OffloadConfig
    from vramferry.planning.devices import PRESETS
    from vramferry.planning.planner import plan

    spec = get_arch("wan2.2-t2v-a14b")
    inventory = spec.inventory()
    wan21 = get_arch("wan2.1-t2v-14b").inventory().get("transformer")
    high, low = inventory.get("transformer"), inventory.get("transformer_2")
    assert high.bytes == low.bytes == wan21.bytes and high.block_bytes == wan21.block_bytes
    assert inventory.order == ("text_encoder", "transformer", "transformer_2", "vae")
    assert [c.name for c in spec.modules().dits] == ["transformer", "transformer_2"]
    h100, work = PRESETS["h100"], spec.workload
    model = plan(inventory, OffloadConfig(mode="model"), device=h100, workload=work)
    # One expert (and its activations) at a time: the other is neither resident nor prefetched beside it...
    assert high.bytes < model.predicted_peak_bytes < 2 * high.bytes
    # ...unless a budget is given that holds both: then the low-noise expert loads during the high-noise one.
    given = plan(inventory, OffloadConfig(mode="model", vram_budget="78GiB"), device=h100, workload=work)
    assert given.predicted_peak_bytes > 2 * high.bytes
    assert spec.workload.sequence_of(high.shape) == 75600  # 1280×720, 81 frames


def test_qwen_image_sizes():
    spec = get_arch("qwen-image")
    pipe = spec.build()
    assert _params(pipe.transformer) == pytest.approx(20.43e9, rel=0.01)
    assert _params(pipe.text_encoder) == pytest.approx(8.29e9, rel=0.01)  # Qwen2.5-VL-7B-Instruct
    inventory = spec.inventory()
    assert len(inventory.get("transformer").block_bytes) == 60
    assert inventory.get("transformer").bytes == pytest.approx(40.86 * GB, rel=0.01)


def test_pipelines_look_like_diffusers_pipelines():
    flux = get_arch("flux1-dev").build()
    assert set(flux.components) == {"text_encoder", "text_encoder_2", "transformer", "vae"}
    assert type(flux.transformer).__name__ == "FluxTransformer2DModel"
    assert type(flux.text_encoder_2).__name__ == "T5EncoderModel"
    assert flux._dit_modules == ["transformer"] and flux._vae_modules == ["vae"]
    wan = get_arch("wan2.1-t2v-14b").build()
    assert type(wan.transformer).__name__ == "WanTransformer3DModel"
    assert type(wan.text_encoder).__name__ == "UMT5EncoderModel"
    assert type(wan.vae).__name__ == "AutoencoderKLWan"
    qwen = get_arch("qwen-image").build()
    assert type(qwen.text_encoder).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(qwen.vae).__name__ == "AutoencoderKLQwenImage"


def test_modules_declare_roles_and_blocks():
    spec = get_arch("wan2.1-t2v-14b")
    modules = spec.modules()
    assert [c.name for c in modules.dits] == ["transformer"]
    assert [c.name for c in modules.encoders] == ["text_encoder"]
    blocks = modules.blocks["transformer"]
    assert blocks.attrs == ("blocks",) and len(blocks.blocks) == 40 and blocks.names[-1] == "blocks.39"


def test_workloads_and_lookup():
    assert get_arch("flux1-dev").workload.cfg == 1
    assert get_arch("wan2.1-t2v-14b").workload.cfg == 2
    assert get_arch("flux1-dev").with_workload(height=512).height == 512
    with pytest.raises(ValueError, match="flux1-dev"):
        get_arch("sdxl")
