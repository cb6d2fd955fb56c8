"""The tiny real pipelines the other tests rely on: they run, are deterministic, and actually use the prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.diffusers_pipes import OTHER_PROMPT, pipeline_param_counts, run
from vramferry.pipelines import DEMO_DEFAULTS, build_demo_pipeline
from vramferry.pipelines import tokenizers as toks

pytest.importorskip("diffusers")

_first_runs: dict[str, dict[str, np.ndarray]] = {}


def _first_run(name, pipe, kwargs) -> dict[str, np.ndarray]:
    if name not in _first_runs:
        _first_runs[name] = run(pipe, kwargs)
    return _first_runs[name]


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_runs_finite_and_deterministic(diffusers_pipeline):
    name, pipe, kwargs = diffusers_pipeline
    first = _first_run(name, pipe, kwargs)
    second = run(pipe, kwargs)
    for key, value in first.items():
        assert np.isfinite(value).all(), f"{name}: non-finite {key}"
        assert value.size > 0
        np.testing.assert_array_equal(value, second[key], err_msg=f"{name}: {key} differs between two runs")
    visual = first.get("images", first.get("frames"))
    assert visual.min() >= 0.0 and visual.max() <= 1.0, f"{name}: pixels outside [0, 1]"


def test_prompt_reaches_output(diffusers_pipeline):
    name, pipe, kwargs = diffusers_pipeline
    assert kwargs["prompt"] != OTHER_PROMPT
    diff = _max_diff(_first_run(name, pipe, kwargs), run(pipe, kwargs, prompt=OTHER_PROMPT))
    assert diff > 1e-4, f"{name}: changing the prompt changed the output by only {diff}"


def test_fixture_is_tiny(diffusers_pipeline):
    name, pipe, _ = diffusers_pipeline
    counts = pipeline_param_counts(pipe)
    assert sum(counts.values()) < 5_000_000, f"{name}: {counts}"


def test_output_shapes(diffusers_pipeline):
    name, pipe, kwargs = diffusers_pipeline
    out = _first_run(name, pipe, kwargs)
    height, width = kwargs["height"], kwargs["width"]
    if "images" in out:
        assert out["images"].shape == (1, height, width, 3)
    else:
        assert out["frames"].shape == (1, kwargs["num_frames"], height, width, 3)


def test_wan_runs_both_experts():
    from pipelines.diffusers_pipes import build_wan

    pipe, kwargs = build_wan()
    assert pipe.config.boundary_ratio is not None
    calls: list[str] = []
    handles = [
        getattr(pipe, name).register_forward_pre_hook(lambda *_, n=name: calls.append(n))
        for name in ("transformer", "transformer_2")
    ]
    try:
        run(pipe, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert calls[0] == "transformer" and calls[-1] == "transformer_2", calls


def test_ltx2_has_audio_components_and_output():
    from pipelines.diffusers_pipes import build_ltx2

    pipe, kwargs = build_ltx2()
    for component in ("vae", "audio_vae", "vocoder", "connectors", "text_encoder", "transformer"):
        assert isinstance(getattr(pipe, component), torch.nn.Module), component
    audio = run(pipe, kwargs)["audio"]
    assert audio.shape[:2] == (1, pipe.vocoder.config.out_channels) and audio.shape[-1] > 0


def test_flux_save_and_reload_round_trip(tiny_flux, saved_flux_dir):
    from diffusers import DiffusionPipeline

    pipe, kwargs = tiny_flux
    reloaded = DiffusionPipeline.from_pretrained(saved_flux_dir)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded) is type(pipe)
    expected, got = run(pipe, kwargs), run(reloaded, kwargs)
    np.testing.assert_allclose(got["images"], expected["images"], atol=1e-5, rtol=0)


def test_flux_component_layout(tiny_flux):
    pipe, _ = tiny_flux
    assert pipe.model_cpu_offload_seq == "text_encoder->text_encoder_2->image_encoder->transformer->vae"
    assert {
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "transformer",
        "vae",
        "scheduler",
    } <= set(pipe.components)
    assert len(pipe.transformer.transformer_blocks) == 1
    assert len(pipe.transformer.single_transformer_blocks) == 1


def test_tokenizer_sizes():
    clip = toks.build_clip_tokenizer()
    assert len(clip) == toks.CLIP_VOCAB_SIZE and clip.model_max_length == 77
    assert clip.convert_tokens_to_ids("<|endoftext|>") == len(clip) - 1
    t5 = toks.build_t5_tokenizer()
    assert len(t5) == toks.T5_VOCAB_SIZE
    pieces = t5.convert_ids_to_tokens(t5("A painting of a squirrel eating a burger, 4k!").input_ids)
    assert pieces == [
        "▁A",
        "▁painting",
        "▁of",
        "▁a",
        "▁squirrel",
        "▁eating",
        "▁a",
        "▁burger",
        ",",
        "▁4",
        "k",
        "!",
        "</s>",
    ]
    assert len(toks.build_qwen2_tokenizer()) == toks.QWEN_VOCAB_SIZE
    assert len(toks.build_gemma_tokenizer()) == toks.GEMMA_VOCAB_SIZE


def test_tokenizers_are_deterministic():
    text = "high quality photograph of a dog on the beach"
    for build in (toks.build_clip_tokenizer, toks.build_t5_tokenizer, toks.build_qwen2_tokenizer):
        assert build()(text).input_ids == build()(text).input_ids


def test_qwen_template_prefix_matches_dropped_tokens():
    from pipelines.diffusers_pipes import build_qwenimage

    pipe, _ = build_qwenimage()
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34


def test_demo_pipeline_generates_requested_size(demo_pipeline):
    pipe = demo_pipeline
    assert type(pipe).__name__ == "FluxPipeline"
    assert pipe.transformer.config.in_channels == 64
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    kwargs = {**DEMO_DEFAULTS, "height": 128, "width": 192, "num_inference_steps": 2, "output_type": "np"}
    image = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images
    assert image.shape == (1, 128, 192, 3)
    assert np.isfinite(image).all()


def test_demo_defaults_run(demo_pipeline):
    out = demo_pipeline(**DEMO_DEFAULTS, generator=torch.Generator("cpu").manual_seed(0))
    image = out.images[0]
    assert image.size == (DEMO_DEFAULTS["width"], DEMO_DEFAULTS["height"])


def test_demo_pipeline_is_reproducible(demo_pipeline):
    again = build_demo_pipeline(seed=0)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(demo_pipeline, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    other = build_demo_pipeline(seed=1)
    assert not torch.equal(next(other.transformer.parameters()), next(demo_pipeline.transformer.parameters()))


@pytest.mark.gpu
def test_demo_pipeline_runs_on_cuda():
    pipe = build_demo_pipeline(seed=0).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**DEMO_DEFAULTS, "num_inference_steps": 2, "output_type": "np"}
    image = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0)).images
    assert image.shape == (1, DEMO_DEFAULTS["height"], DEMO_DEFAULTS["width"], 3)
    assert np.isfinite(image).all()
