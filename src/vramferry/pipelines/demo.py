"""The built-in demo pipeline: a real diffusers ``FluxPipeline`` with small random weights.

It lets a fresh machine (no GPU, no network, no downloaded weights) run everything vramferry does: discovery,
planning, offload and generation. It has FLUX.1's production layout, scaled down:

- the same latent shapes: 16 latent channels, a 4-level VAE (8x spatial compression), 2x2 patch packing, so
  the transformer takes 64 input channels;
- the same module structure: a CLIP text encoder (pooled embedding), a T5 encoder (sequence embedding),
  ``transformer_blocks`` (double stream) and ``single_transformer_blocks``, guidance embedding as in
  FLUX.1-dev, and the dynamic-shift flow-matching scheduler;
- but hidden size 128 and 2 + 2 blocks: 2.43 M parameters (9.7 MB in float32), 1.86 M of them in the
  transformer.

The weights are random, so the image is coloured noise; a 256x256 image with 4 steps takes about 0.1 s on two
CPU cores (after a ~2 s first build, mostly imports). Tokenizers are built in code (:mod:`vramferry.pipelines.tokenizers`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .extras import require_extra

logger = logging.getLogger(__name__)

#: How the CLI runs the demo when no ``--model`` is given.
DEMO_DEFAULTS: dict[str, Any] = {
    "prompt": "a photo of a cat on the beach at night",
    "num_inference_steps": 4,
    "height": 256,
    "width": 256,
    "guidance_scale": 3.5,
    "max_sequence_length": 64,
}

# Transformer: 4 heads x 32 = hidden 128; rotary axes (text id, row, column) sum to the head dim.
_HEADS, _HEAD_DIM, _AXES_DIMS_ROPE = 4, 32, (8, 12, 12)
_DOUBLE_BLOCKS, _SINGLE_BLOCKS = 2, 2
_TEXT_HIDDEN = 64  # CLIP hidden size (= pooled projection) and T5 d_model (= joint attention dim)
_LATENT_CHANNELS = 16
_VAE_CHANNELS = (16, 32, 32, 32)
_MAX_DEMO_PARAMS = 4_000_000


def _text_encoders(clip_tok: Any, t5_tok: Any, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    transformers = require_extra("transformers")
    clip_config = transformers.CLIPTextConfig(
        vocab_size=len(clip_tok),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=4 * _TEXT_HIDDEN,
        projection_dim=_TEXT_HIDDEN,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=clip_tok.model_max_length,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
        bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id,
    )
    t5_config = transformers.T5Config(
        vocab_size=len(t5_tok),
        d_model=_TEXT_HIDDEN,
        d_kv=16,
        d_ff=2 * _TEXT_HIDDEN,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    clip = transformers.CLIPTextModel(clip_config).eval()
    torch.manual_seed(seed + 1)
    t5 = transformers.T5EncoderModel(t5_config).eval()
    return clip, t5


def _transformer_and_vae(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    diffusers = require_extra("diffusers")
    torch.manual_seed(seed + 2)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * _LATENT_CHANNELS,  # 2x2 latent patches packed into channels
        num_layers=_DOUBLE_BLOCKS,
        num_single_layers=_SINGLE_BLOCKS,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=_TEXT_HIDDEN,
        pooled_projection_dim=_TEXT_HIDDEN,
        guidance_embeds=True,
        axes_dims_rope=list(_AXES_DIMS_ROPE),
    )
    levels = len(_VAE_CHANNELS)
    torch.manual_seed(seed + 3)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=_VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=256,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    return transformer.eval(), vae.eval()


def build_demo_pipeline(seed: int = 0):
    """Build the demo ``FluxPipeline`` (random weights, on the CPU, float32); see the module docstring.

    Args:
        seed: seeds the weight initialisation; the same seed gives the same weights in every process.

    Returns:
        A ``diffusers.FluxPipeline``; run it with ``pipe(**DEMO_DEFAULTS)``.
    """
    diffusers = require_extra("diffusers")
    from .tokenizers import build_clip_tokenizer, build_t5_tokenizer

    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    clip, t5 = _text_encoders(clip_tok, t5_tok, seed)
    transformer, vae = _transformer_and_vae(seed)
    # FLUX.1-dev's scheduler: the shift grows with the image token count.
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = diffusers.FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
    total = sum(p.numel() for m in (clip, t5, transformer, vae) for p in m.parameters())
    if total > _MAX_DEMO_PARAMS:
        raise RuntimeError(f"the demo pipeline has {total} parameters, more than {_MAX_DEMO_PARAMS}")
    logger.debug("built the demo FluxPipeline: %d parameters, seed %d", total, seed)
    return pipe
