"""Real diffusers pipelines with tiny configs, random weights and tokenizers built in code (no Hub, no files).

Each ``build_*`` function returns ``(pipe, call_kwargs)``: ``pipe(**call_kwargs, generator=seeded())`` runs
2 steps at a small size with ``output_type="np"``. The kwargs carry no generator; callers add
``generator=seeded()`` (``torch.Generator("cpu").manual_seed(0)``) so runs are reproducible.

Builders assert the parameter count of every module (upper bounds: a config argument that silently kept its
production default would make a "tiny" fixture hundreds of MB) and the tokenizer sizes.

- ``flux``: FluxPipeline with diffusers' own test shapes (1-level VAE, 4 latent channels).
- ``flux_production``: FluxPipeline with FLUX.1's latent layout (16 latent channels, 4-level VAE,
  transformer ``in_channels=64``).
- ``sd3``: StableDiffusion3Pipeline (two CLIP encoders with projection and a T5).
- ``wan``: WanPipeline shaped like Wan 2.2 A14B: two experts, ``transformer`` for the high-noise steps and
  ``transformer_2`` for the low-noise ones, switched at ``boundary_ratio``; both run within the 2 steps.
- ``ltx2``: LTX2Pipeline (audio + video): a Gemma 3 text encoder, text ``connectors``, the video ``vae``, the
  ``audio_vae`` and the ``vocoder``, all tiny.
- ``qwenimage``: QwenImagePipeline with a Qwen2.5-VL text encoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vramferry.pipelines import tokenizers as toks

Builder = Callable[[], tuple[Any, dict[str, Any]]]

PROMPT = "A painting of a squirrel eating a burger"
OTHER_PROMPT = "a photo of a cat"


def seeded(seed: int = 0) -> torch.Generator:
    """The CPU generator every fixture run uses."""
    return torch.Generator("cpu").manual_seed(seed)


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def pipeline_param_counts(pipe: Any) -> dict[str, int]:
    """Parameter count of every ``nn.Module`` component of a pipeline."""
    return {
        name: param_count(module)
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


def _check_params(pipe: Any, limits: dict[str, int]) -> None:
    counts = pipeline_param_counts(pipe)
    assert set(counts) == set(limits), f"{type(pipe).__name__} modules {sorted(counts)} != {sorted(limits)}"
    for name, count in counts.items():
        assert 0 < count <= limits[name], (
            f"{type(pipe).__name__}.{name} has {count} params (limit {limits[name]})"
        )


def _finish(pipe: Any, limits: dict[str, int]) -> Any:
    _check_params(pipe, limits)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_outputs(result: Any) -> dict[str, np.ndarray]:
    """The numeric outputs of a pipeline call (``images``, ``frames``, ``audio``) as float64 numpy arrays."""
    outputs = {}
    for key in ("images", "frames", "audio"):
        value = getattr(result, key, None)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            value = value.float().cpu().numpy()
        outputs[key] = np.asarray(value, dtype=np.float64)
    assert outputs, f"no images, frames or audio in {type(result).__name__}"
    return outputs


def run(pipe: Any, kwargs: dict[str, Any], seed: int = 0, **overrides: Any) -> dict[str, np.ndarray]:
    """Call ``pipe`` with the fixture's kwargs (``overrides`` win) and a seeded generator."""
    return call_outputs(pipe(**{**kwargs, **overrides}, generator=seeded(seed)))


def assert_runs_equal(
    pipe: Any, kwargs: dict[str, Any], expected: dict[str, np.ndarray], times: int = 2
) -> None:
    """Run ``pipe`` ``times`` times; every output must equal ``expected`` bit for bit."""
    for _ in range(times):
        got = run(pipe, kwargs)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


# --- shared text encoders -------------------------------------------------------------------------------------


def clip_text_encoder(tokenizer: Any, with_projection: bool = False, seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=max(1000, len(tokenizer)),
        hidden_size=32,
        intermediate_size=37,
        projection_dim=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls(config).eval()


def t5_text_encoder(tokenizer: Any, umt5: bool = False) -> torch.nn.Module:
    import transformers

    config_cls, model_cls = (
        (transformers.UMT5Config, transformers.UMT5EncoderModel)
        if umt5
        else (transformers.T5Config, transformers.T5EncoderModel)
    )
    config = config_cls(
        vocab_size=max(100, len(tokenizer)),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    return model_cls(config).eval()


# --- Flux -----------------------------------------------------------------------------------------------------


def _flux(production: bool) -> tuple[Any, dict[str, Any]]:
    import diffusers

    clip_tok, t5_tok = toks.build_clip_tokenizer(), toks.build_t5_tokenizer()
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=64 if production else 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    levels = 4 if production else 1
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,) * levels,
        layers_per_block=1,
        latent_channels=16 if production else 1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159 if production else 0.0609,
        scaling_factor=0.3611 if production else 1.5035,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
    )
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip_text_encoder(clip_tok),
        tokenizer=clip_tok,
        text_encoder_2=t5_text_encoder(t5_tok),
        tokenizer_2=t5_tok,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    limits = {
        "vae": 9_000 if production else 3_000,
        "text_encoder": 50_000,
        "text_encoder_2": 22_000,
        "transformer": 75_000 if production else 70_000,
    }
    size = 64 if production else 32
    kwargs = dict(
        prompt=PROMPT,
        num_inference_steps=2,
        guidance_scale=5.0,
        height=size,
        width=size,
        max_sequence_length=48,
        output_type="np",
    )
    return _finish(pipe, limits), kwargs


def build_flux() -> tuple[Any, dict[str, Any]]:
    """FluxPipeline with diffusers' test shapes; 32x32."""
    return _flux(production=False)


def build_flux_production() -> tuple[Any, dict[str, Any]]:
    """FluxPipeline with FLUX.1's latent layout (packed latents ``(1, 16, 64)`` at 64x64)."""
    return _flux(production=True)


# --- SD3 ------------------------------------------------------------------------------------------------------


def _small_vae(latent_channels: int) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def build_sd3() -> tuple[Any, dict[str, Any]]:
    """StableDiffusion3Pipeline: two CLIP encoders with projection, a T5, a 1-level VAE; 32x32."""
    import diffusers

    clip_tok, clip_tok_2, t5_tok = (
        toks.build_clip_tokenizer(),
        toks.build_clip_tokenizer(),
        toks.build_t5_tokenizer(),
    )
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    pipe = diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=_small_vae(latent_channels=4),
        text_encoder=clip_text_encoder(clip_tok, with_projection=True),
        tokenizer=clip_tok,
        text_encoder_2=clip_text_encoder(clip_tok_2, with_projection=True, seed=1),
        tokenizer_2=clip_tok_2,
        text_encoder_3=t5_text_encoder(t5_tok),
        tokenizer_3=t5_tok,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    limits = {
        "vae": 3_500,
        "text_encoder": 50_000,
        "text_encoder_2": 50_000,
        "text_encoder_3": 22_000,
        "transformer": 42_000,
    }
    kwargs = dict(
        prompt=PROMPT,
        negative_prompt="blurry",
        num_inference_steps=2,
        guidance_scale=5.0,
        height=32,
        width=32,
        max_sequence_length=32,
        output_type="np",
    )
    return _finish(pipe, limits), kwargs


# --- Wan 2.2 (two experts) ------------------------------------------------------------------------------------

# Wan 2.2 T2V A14B's value. With shift 7 and 2 steps the timesteps are 1000 and ~47: the first step runs
# `transformer` (t >= 875, high noise), the second `transformer_2`.
WAN_BOUNDARY_RATIO = 0.875


def _wan_transformer(seed: int) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def build_wan() -> tuple[Any, dict[str, Any]]:
    """WanPipeline shaped like Wan 2.2 T2V A14B: ``transformer`` + ``transformer_2`` + ``boundary_ratio``."""
    import diffusers

    tokenizer = toks.build_t5_tokenizer()
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    pipe = diffusers.WanPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_text_encoder(tokenizer, umt5=True),
        vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=_wan_transformer(seed=0),
        transformer_2=_wan_transformer(seed=1),
        boundary_ratio=WAN_BOUNDARY_RATIO,
    )
    limits = {"vae": 15_000, "text_encoder": 24_000, "transformer": 30_000, "transformer_2": 30_000}
    kwargs = dict(
        prompt="dance monkey",
        negative_prompt="bad quality",
        num_inference_steps=2,
        guidance_scale=6.0,
        guidance_scale_2=4.0,
        height=16,
        width=16,
        num_frames=9,
        max_sequence_length=16,
        output_type="np",
    )
    return _finish(pipe, limits), kwargs


# --- LTX-2 (video + audio) ------------------------------------------------------------------------------------


def _gemma3_text_encoder(tokenizer: Any) -> torch.nn.Module:
    import transformers

    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=8,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    vision_config = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
    )
    config = transformers.Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=4,
        # The image and boundary token ids must exist in the (tiny) vocabulary; no image is ever passed.
        boi_token_index=tokenizer.convert_tokens_to_ids("<mask>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<mask>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<mask>"),
    )
    torch.manual_seed(0)
    return transformers.Gemma3ForConditionalGeneration(config).eval()


def _ltx2_video_vae() -> torch.nn.Module:
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLLTX2Video(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        layers_per_block=(1,),
        decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False),
        downsample_type=("spatial",),
        upsample_residual=(False,),
        upsample_factor=(1,),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return vae


def _ltx2_audio(text_hidden: int, text_layers: int) -> dict[str, torch.nn.Module]:
    import diffusers
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    torch.manual_seed(0)
    connectors = LTX2TextConnectors(
        caption_channels=text_hidden,
        text_proj_in_factor=text_layers + 1,
        # The connectors' width (heads x head_dim) must equal the text encoder's hidden size.
        video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=text_hidden // 2,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=text_hidden // 2,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32,
        rope_theta=10000.0,
        rope_double_precision=False,
        causal_temporal_positioning=False,
        rope_type="split",
    )
    torch.manual_seed(0)
    audio_vae = diffusers.AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=None,
        in_channels=2,
        resolution=32,
        latent_channels=2,
        norm_type="pixel",
        causality_axis="height",
        dropout=0.0,
        mid_block_add_attention=False,
        sample_rate=16000,
        mel_hop_length=160,
        is_causal=True,
        mel_bins=8,
    )
    torch.manual_seed(0)
    vocoder = LTX2Vocoder(
        in_channels=2 * 8,
        hidden_channels=32,
        out_channels=2,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    )
    return {"connectors": connectors, "audio_vae": audio_vae, "vocoder": vocoder}


def build_ltx2() -> tuple[Any, dict[str, Any]]:
    """LTX2Pipeline (joint audio + video): Gemma 3 text encoder, connectors, video VAE, audio VAE, vocoder."""
    import diffusers

    tokenizer = toks.build_gemma_tokenizer()
    text_encoder = _gemma3_text_encoder(tokenizer)
    text_config = text_encoder.config.text_config
    torch.manual_seed(0)
    transformer = diffusers.LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        caption_channels=text_config.hidden_size,
        rope_double_precision=False,
        rope_type="split",
    )
    pipe = diffusers.LTX2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=_ltx2_video_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        **_ltx2_audio(text_config.hidden_size, text_config.num_hidden_layers),
    )
    limits = {
        "vae": 30_000,
        "audio_vae": 3_000,
        "text_encoder": 23_000,
        "connectors": 8_000,
        "transformer": 40_000,
        "vocoder": 13_000,
    }
    kwargs = dict(
        prompt="dance monkey",
        negative_prompt="bad quality",
        num_inference_steps=2,
        guidance_scale=3.0,
        stg_scale=0.0,
        modality_scale=1.0,
        guidance_rescale=0.0,
        audio_guidance_scale=3.0,
        audio_stg_scale=0.0,
        audio_modality_scale=1.0,
        audio_guidance_rescale=0.0,
        spatio_temporal_guidance_blocks=None,
        use_cross_timestep=False,
        height=32,
        width=32,
        num_frames=5,
        frame_rate=25.0,
        max_sequence_length=16,
        output_type="np",
    )
    return _finish(pipe, limits), kwargs


# --- QwenImage ------------------------------------------------------------------------------------------------


def _qwen_text_encoder(tokenizer: Any) -> torch.nn.Module:
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    vocab_size = len(tokenizer) + 8
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=vocab_size,
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            rope_theta=1_000_000.0,
        ),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16,
        vocab_size=vocab_size,
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        vision_token_id=ids("<|image_pad|>"),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
    )
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def build_qwenimage() -> tuple[Any, dict[str, Any]]:
    """QwenImagePipeline with a tiny Qwen2.5-VL text encoder; CFG on (``true_cfg_scale=2``); 32x32."""
    import diffusers

    tokenizer = toks.build_qwen2_tokenizer()
    torch.manual_seed(0)
    transformer = diffusers.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    pipe = diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_qwen_text_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    prefix = pipe.prompt_template_encode.split("{}")[0]
    prefix_len = len(tokenizer(prefix).input_ids)
    assert prefix_len == pipe.prompt_template_encode_start_idx, (
        f"QwenImage template prefix is {prefix_len} tokens, the pipeline drops "
        f"{pipe.prompt_template_encode_start_idx}: the prompt would not reach the transformer"
    )
    limits = {"vae": 4_100_000, "text_encoder": 46_000, "transformer": 200_000}
    kwargs = dict(
        prompt="dance monkey",
        negative_prompt="bad quality",
        true_cfg_scale=2.0,
        num_inference_steps=2,
        height=32,
        width=32,
        max_sequence_length=16,
        output_type="np",
    )
    return _finish(pipe, limits), kwargs


DIFFUSERS_PIPELINES: dict[str, Builder] = {
    "flux": build_flux,
    "flux_production": build_flux_production,
    "sd3": build_sd3,
    "wan": build_wan,
    "ltx2": build_ltx2,
    "qwenimage": build_qwenimage,
}
