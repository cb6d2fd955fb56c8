"""Full-size pipelines with random bf16 weights, built directly on the GPU (no downloads).

Large modules are built on the meta device and materialised on the GPU, where random initialisation takes a
second instead of minutes on the host.
"""

from __future__ import annotations

import torch
from torch import nn

from vramferry.planning.archs import FLUX1_DEV_TRANSFORMER, FLUX1_VAE
from vramferry.planning.archs import T5_XXL as ARCH_T5_XXL

BF16 = torch.bfloat16

# The published configs (vramferry.planning.archs holds them for `vramferry plan --arch` too). T5's remaining fields keep
# T5Config's defaults, which are T5-XXL's (its dropout does not run in eval mode).
FLUX_DEV = FLUX1_DEV_TRANSFORMER
T5_XXL = {**ARCH_T5_XXL, "vocab_size": 32128}
FLUX_VAE = FLUX1_VAE


def materialise(build, device: str = "cuda", dtype: torch.dtype = BF16) -> nn.Module:
    """Build with ``build()`` on the meta device, allocate on ``device``, fill with N(0, 0.02)."""
    with torch.device("meta"):
        module = build().to(dtype)
    module = module.to_empty(device=device)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
        for name, _buffer in module.named_buffers():
            raise RuntimeError(
                f"{type(module).__name__}.{name}: buffers need real values; build it on the host"
            )
    return module.eval()


def flux_transformer(device: str = "cuda", **overrides) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return materialise(lambda: FluxTransformer2DModel(**{**FLUX_DEV, **overrides}), device)


def flux_pipeline(device: str = "cuda"):
    """FLUX.1-dev's layout at full size: CLIP-L, T5-XXL encoder, the 12B transformer, the 16-channel VAE."""
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    from vramferry.pipelines.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    clip_cfg = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
        bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id,
    )
    with torch.device(device):  # has buffers (position ids): construct for real, on the GPU
        clip = transformers.CLIPTextModel(clip_cfg).to(BF16).eval()
        vae = AutoencoderKL(**FLUX_VAE).to(BF16).eval()
    t5 = materialise(lambda: transformers.T5EncoderModel(transformers.T5Config(**T5_XXL)), device)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=flux_transformer(device),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_inputs(tokens: int, device: str = "cuda") -> dict:
    return dict(
        hidden_states=torch.randn(1, tokens, 64, device=device, dtype=BF16),
        encoder_hidden_states=torch.randn(1, 512, 4096, device=device, dtype=BF16),
        pooled_projections=torch.randn(1, 768, device=device, dtype=BF16),
        timestep=torch.tensor([0.5], device=device, dtype=BF16),
        guidance=torch.tensor([3.5], device=device, dtype=BF16),
        img_ids=torch.zeros(tokens, 3, device=device),
        txt_ids=torch.zeros(512, 3, device=device),
        return_dict=False,
    )


def wan_transformer(device: str = "cuda") -> nn.Module:
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    def build():
        model = WanTransformer3DModel()  # the defaults are the 14B config
        model.rope = nn.Identity()  # its buffers are computed below, for real
        return model

    module = materialise(build, device)
    with torch.device(device):
        module.rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024)
    return module


def wan_inputs(frames: int = 81, device: str = "cuda") -> dict:
    lat_f = (frames - 1) // 4 + 1
    return dict(
        hidden_states=torch.randn(1, 16, lat_f, 60, 104, device=device, dtype=BF16),
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(1, 512, 4096, device=device, dtype=BF16),
        return_dict=False,
    )


class OmniGen2Sized:
    """OmniGen2's layout at its sizes: a ~3B Qwen2.5-sized ``mllm``, a ~4B DiT, a 16-channel VAE."""

    _dit_modules = ["transformer"]
    _encoder_modules = ["mllm"]
    _vae_modules = ["vae"]

    def __init__(self, device: str = "cuda") -> None:
        import transformers
        from diffusers import AutoencoderKL

        qwen = transformers.Qwen2Config(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            max_position_embeddings=4096,
        )
        with torch.device(device):  # rotary buffers: construct for real, on the GPU
            self.mllm = transformers.Qwen2ForCausalLM(qwen).to(BF16).eval()
            self.vae = AutoencoderKL(**FLUX_VAE).to(BF16).eval()
        self.transformer = flux_transformer(
            device,
            num_layers=6,
            num_single_layers=14,
            joint_attention_dim=2048,
            pooled_projection_dim=2048,
            guidance_embeds=False,
        )
        self.execution_device = torch.device(device)

    @torch.inference_mode()
    def __call__(self, steps: int = 30, size: int = 1024, seed: int = 0):
        dev = self.execution_device
        ids = torch.randint(0, 151936, (1, 256), generator=torch.Generator().manual_seed(seed)).to(dev)
        hidden = self.mllm(ids, output_hidden_states=True).hidden_states[-1]
        pooled = hidden.mean(dim=1)
        side = size // 16
        latents = torch.randn(1, side * side, 64, generator=torch.Generator().manual_seed(seed)).to(dev, BF16)
        img_ids = torch.zeros(side * side, 3, device=dev)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=dev)
        for i in range(steps):
            t = torch.full((1,), 1 - i / steps, device=dev, dtype=BF16)
            v = self.transformer(
                hidden_states=latents,
                encoder_hidden_states=hidden,
                pooled_projections=pooled,
                timestep=t,
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0]
            latents = latents - v / steps
        z = latents.view(1, side, side, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, side * 2, side * 2)
        return self.vae.decode(z / 0.3611 + 0.1159).sample
