"""Tiny plain-Python pipelines shaped like vLLM-Omni's module-offload pipelines, with random weights.

Each pipeline runs end to end on CPU (encoder -> a denoising loop over the DiT -> VAE decode) and returns a tensor.
They are built to exercise offload code paths that real pipelines hit:

- DiTs keep their repeated blocks in ``nn.ModuleList``s (so layerwise streaming has something to stream);
- VAEs are used only through ``encode``/``decode``, which call submodules, never the VAE's own ``forward``;
- OmniGen2's ``mllm`` is used only through ``generate``, which bypasses the top module's ``forward``;
- Bagel embeds the prompt with the DiT's own ``embed_tokens`` child, outside the DiT's ``forward``;
- LTX-2 keeps everything under a plain-object wrapper (``pipe.*``), with undeclared ``connectors``/``vocoder``.

``CUSTOM_PIPELINES[name]()`` returns ``(pipeline, call_kwargs)``; ``pipeline(**call_kwargs)`` gives the same tensor
on every call (the noise comes from ``seed`` unless a ``generator`` is passed).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

HIDDEN = 32  # model width of every tiny module
LATENT = 4  # latent channels
VOCAB = 64


# ------------------------------------------------------------------------------------------- building blocks


class TinyBlock(nn.Module):
    """A pre-norm MLP block with a conditioning input: the repeated unit of every tiny DiT and encoder."""

    def __init__(self, dim: int = HIDDEN) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        if cond is not None:
            h = h + cond
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(h)))


class TinyTextEncoder(nn.Module):
    """Token embedding, a few blocks, a final norm; ``forward(ids)`` returns hidden states."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(TinyBlock() for _ in range(layers))
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class TinyMLLM(TinyTextEncoder):
    """A multimodal LLM encoder with a ``generate`` method that never calls this module's ``forward``."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__(layers)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding; returns ``(token ids, last hidden states)``. Goes through the children directly."""
        ids = input_ids
        for _ in range(max_new_tokens + 1):
            h = self.embed_tokens(ids)
            for layer in self.layers:
                h = layer(h)
            h = self.norm(h)
            if ids.shape[1] == input_ids.shape[1] + max_new_tokens:
                break
            next_id = self.lm_head(h[:, -1]).argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
        return ids, h


class TinyDiT(nn.Module):
    """Latent tokens in, noise prediction out; ``blocks`` are the repeated unit."""

    def __init__(self, layers: int = 3, blocks_attr: str = "blocks", refiner_layers: int = 0) -> None:
        super().__init__()
        self.blocks_attr = blocks_attr
        if refiner_layers:  # defined (and run) before the main blocks, like OmniGen2's context refiner
            self.context_refiner = nn.ModuleList(TinyBlock() for _ in range(refiner_layers))
        self.proj_in = nn.Linear(LATENT, HIDDEN)
        self.time_embed = nn.Linear(1, HIDDEN)
        self.context_proj = nn.Linear(HIDDEN, HIDDEN)
        self.add_module(blocks_attr, nn.ModuleList(TinyBlock() for _ in range(layers)))
        self.proj_out = nn.Linear(HIDDEN, LATENT)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, ch, height, width = latents.shape
        for block in getattr(self, "context_refiner", ()):
            context = block(context)
        x = self.proj_in(latents.flatten(2).transpose(1, 2))
        cond = self.time_embed(timestep.reshape(-1, 1, 1).to(x.dtype)) + self.context_proj(
            context.mean(1, keepdim=True)
        )
        for block in getattr(self, self.blocks_attr):
            x = block(x, cond)
        return self.proj_out(x).transpose(1, 2).reshape(b, ch, height, width)


class TinyVAE(nn.Module):
    """An autoencoder used only through ``encode``/``decode`` (never its own ``forward``)."""

    scaling_factor = 0.5

    def __init__(self, channels: int = 3, latent: int = LATENT) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, latent, 1))
        self.decoder = nn.Sequential(nn.Conv2d(latent, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, channels, 1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x) * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z / self.scaling_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class TinyAudioVAE(nn.Module):
    """A 1-D autoencoder (audio latents -> mel frames), used through ``decode``."""

    def __init__(self, latent: int = LATENT, mel: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Conv1d(mel, latent, 3, padding=1)
        self.decoder = nn.Conv1d(latent, mel, 3, padding=1)

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        return self.encoder(mel)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


class _TinyPipeline:
    """What the tiny pipelines share: where inputs go, seeded noise and an Euler loop."""

    execution_device = torch.device("cpu")

    def to(self, device: str | torch.device) -> _TinyPipeline:
        """Move every module reachable from the pipeline's (and its wrappers') attributes; inputs follow."""
        self.execution_device = torch.device(device)
        for obj in (self, *[v for v in vars(self).values() if _is_wrapper(v)]):
            for value in vars(obj).values():
                if isinstance(value, nn.Module):
                    value.to(self.execution_device)
        return self

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | None, seed: int) -> torch.Tensor:
        generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=generator, device=generator.device).to(self.execution_device)

    def denoise(
        self, dit: Callable, latents: torch.Tensor, context: torch.Tensor, steps: int
    ) -> torch.Tensor:
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        for i in range(steps):
            t = torch.full((latents.shape[0],), float(sigmas[i]) * 1000, device=self.execution_device)
            latents = latents + (sigmas[i + 1] - sigmas[i]) * dit(latents, t, context)
        return latents


def _is_wrapper(value: object) -> bool:
    return not isinstance(value, (nn.Module, torch.Tensor, torch.device)) and hasattr(value, "__dict__")


def _ids(*tokens: int) -> torch.Tensor:
    return torch.tensor([list(tokens)], dtype=torch.long)


def _kwargs(**extra: object) -> dict:
    return {"prompt_ids": _ids(3, 14, 15, 9, 26), "num_inference_steps": 2, "seed": 0, **extra}


# ---------------------------------------------------------------------------------------------- OmniGen2


class OmniGen2Transformer(TinyDiT):
    """Like OmniGen2's transformer: a ``context_refiner`` list, then the main ``layers``, of one block class."""

    def __init__(self) -> None:
        super().__init__(layers=3, blocks_attr="layers", refiner_layers=2)


class OmniGen2LikePipeline(_TinyPipeline):
    """Encoder ``mllm`` (used through ``generate``), DiT ``transformer``, ``vae``."""

    _dit_modules = ["transformer"]
    _encoder_modules = ["mllm"]
    _vae_modules = ["vae"]

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.mllm = TinyMLLM()
        self.transformer = OmniGen2Transformer()
        self.vae = TinyVAE()

    @torch.no_grad()
    def __call__(self, prompt_ids, num_inference_steps=2, generator=None, seed=0, size=8) -> torch.Tensor:
        _, context = self.mllm.generate(prompt_ids.to(self.execution_device), max_new_tokens=2)
        latents = self.noise((1, LATENT, size, size), generator, seed)
        latents = self.denoise(self.transformer, latents, context, num_inference_steps)
        return self.vae.decode(latents)


# ------------------------------------------------------------------------------------------------- Bagel


class Qwen2MoTModel(nn.Module):
    """The LLM backbone Bagel denoises with; declares its block list the way vLLM-Omni does."""

    _layerwise_offload_blocks_attrs = ["layers"]

    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(TinyBlock() for _ in range(layers))
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class Qwen2MoTForCausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Qwen2MoTModel()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)


class BagelModule(nn.Module):
    """Bagel's glue: holds the language model again plus the small modules around it."""

    def __init__(self, language_model: nn.Module) -> None:
        super().__init__()
        self.language_model = language_model
        self.time_embedder = nn.Sequential(nn.Linear(1, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, HIDDEN))
        self.vae2llm = nn.Linear(LATENT, HIDDEN)
        self.connector = nn.Linear(HIDDEN, LATENT)
        self.vit_model = nn.Sequential(nn.Linear(48, HIDDEN), nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, HIDDEN))


class BagelLikePipeline(_TinyPipeline):
    """DiT ``language_model.model``; no encoders; residents inside ``bagel``; ``bagel.vit_model`` undeclared."""

    _dit_modules = ["language_model.model"]
    _encoder_modules: list[str] = []
    _vae_modules = ["vae"]
    _resident_modules = ["bagel.time_embedder", "bagel.vae2llm", "bagel.connector"]

    def __init__(self) -> None:
        torch.manual_seed(1)
        self.language_model = Qwen2MoTForCausalLM()
        self.bagel = BagelModule(self.language_model)
        self.vae = TinyVAE()

    def _velocity(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, ch, height, width = latents.shape
        x = self.bagel.vae2llm(latents.flatten(2).transpose(1, 2))
        x = x + self.bagel.time_embedder(t.reshape(-1, 1, 1) / 1000)
        h = self.language_model.model(torch.cat([text, x], dim=1))
        return self.bagel.connector(h[:, text.shape[1] :]).transpose(1, 2).reshape(b, ch, height, width)

    @torch.no_grad()
    def __call__(self, prompt_ids, num_inference_steps=2, generator=None, seed=0, size=8) -> torch.Tensor:
        # Like Bagel, the prompt goes through the DiT's own embedding table, outside the DiT's forward.
        text = self.language_model.model.embed_tokens(prompt_ids.to(self.execution_device))
        latents = self.noise((1, LATENT, size, size), generator, seed)
        latents = self.denoise(self._velocity, latents, text, num_inference_steps)
        return self.vae.decode(latents)


# ------------------------------------------------------------------------------------------------- LTX-2


class LTX2Transformer(TinyDiT):
    """Video latents plus an audio stream; declares its blocks with vramferry's class attribute."""

    _offload_block_attrs = ("transformer_blocks",)

    def __init__(self) -> None:
        super().__init__(layers=2, blocks_attr="transformer_blocks")
        self.audio_proj_in = nn.Linear(LATENT, HIDDEN)
        self.audio_proj_out = nn.Linear(HIDDEN, LATENT)

    def forward_audio(self, audio: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.audio_proj_in(audio.transpose(1, 2)) + context.mean(1, keepdim=True)
        return self.audio_proj_out(x).transpose(1, 2)


class LTX2Connectors(nn.Module):
    """Refines the text encoder's states for the video and the audio streams."""

    def __init__(self) -> None:
        super().__init__()
        self.video_connector = TinyBlock()
        self.audio_connector = TinyBlock()

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.video_connector(states), self.audio_connector(states)


class LTX2Inner:
    """The plain-object diffusers-style pipeline LTX-2's two-stage wrapper holds."""

    def __init__(self) -> None:
        self.text_encoder = TinyTextEncoder()
        self.connectors = LTX2Connectors()
        self.transformer = LTX2Transformer()
        self.vae = TinyVAE()
        self.audio_vae = TinyAudioVAE()
        self.vocoder = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.Tanh(), nn.Conv1d(8, 1, 1))


class LTX2TwoStagesLikePipeline(_TinyPipeline):
    """Everything under ``pipe``; two denoising stages (low resolution, then upsampled); video + audio out."""

    _dit_modules = ["pipe.transformer"]
    _encoder_modules = ["pipe.text_encoder"]
    _vae_modules = ["pipe.vae", "pipe.audio_vae"]

    def __init__(self) -> None:
        torch.manual_seed(2)
        self.pipe = LTX2Inner()

    @torch.no_grad()
    def __call__(self, prompt_ids, num_inference_steps=2, generator=None, seed=0, size=4) -> torch.Tensor:
        p = self.pipe
        video_ctx, audio_ctx = p.connectors(p.text_encoder(prompt_ids.to(self.execution_device)))
        generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        latents = self.noise((1, LATENT, size, size), generator, seed)
        latents = self.denoise(p.transformer, latents, video_ctx, num_inference_steps)  # stage 1
        latents = torch.nn.functional.interpolate(latents, scale_factor=2.0, mode="nearest")
        latents = latents + 0.1 * self.noise(tuple(latents.shape), generator, seed)
        latents = self.denoise(p.transformer, latents, video_ctx, num_inference_steps)  # stage 2
        audio = p.transformer.forward_audio(self.noise((1, LATENT, 6), generator, seed), audio_ctx)
        video = p.vae.decode(latents)
        waveform = p.vocoder(p.audio_vae.decode(audio))
        return torch.cat([video.flatten(1), waveform.flatten(1)], dim=1)


# ---------------------------------------------------------------------------------------------- MammothModa2


class MammothModa2LikePipeline(_TinyPipeline):
    """DiT ``gen_transformer``, VAE ``gen_vae``, encoder ``gen_image_condition_refiner`` (from a source image)."""

    _dit_modules = ["gen_transformer"]
    _encoder_modules = ["gen_image_condition_refiner"]
    _vae_modules = ["gen_vae"]

    def __init__(self) -> None:
        torch.manual_seed(3)
        self.gen_vae = TinyVAE()
        self.gen_image_condition_refiner = TinyTextEncoder(layers=2)
        self.gen_image_condition_refiner.embed_tokens = nn.Linear(LATENT, HIDDEN)  # image latents, not tokens
        self.gen_transformer = TinyDiT(layers=4)

    @torch.no_grad()
    def __call__(self, image, num_inference_steps=2, generator=None, seed=0) -> torch.Tensor:
        cond = self.gen_vae.encode(image.to(self.execution_device))
        context = self.gen_image_condition_refiner(cond.flatten(2).transpose(1, 2))
        latents = self.noise(tuple(cond.shape), generator, seed)
        latents = self.denoise(self.gen_transformer, latents, context, num_inference_steps)
        return self.gen_vae.decode(latents)


# ---------------------------------------------------------------------------------------------- DreamID-Omni


class FusedBlock(nn.Module):
    """One video block and one audio block that exchange information (DreamID-Omni's fused blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.video = TinyBlock()
        self.audio = TinyBlock()

    def forward(
        self, v: torch.Tensor, a: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.video(v, cond + a.mean(1, keepdim=True)), self.audio(a, cond + v.mean(1, keepdim=True))


class DreamIDTransformer(nn.Module):
    _layerwise_offload_blocks_attrs = ["fused_blocks"]

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.video_in = nn.Linear(LATENT, HIDDEN)
        self.audio_in = nn.Linear(LATENT, HIDDEN)
        self.time_embed = nn.Linear(1, HIDDEN)
        self.fused_blocks = nn.ModuleList(FusedBlock() for _ in range(layers))
        self.video_out = nn.Linear(HIDDEN, LATENT)
        self.audio_out = nn.Linear(HIDDEN, LATENT)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        video, audio = latents  # a (video, audio) pair packed into one tensor by the caller
        v = self.video_in(video.flatten(2).transpose(1, 2))
        a = self.audio_in(audio.flatten(2).transpose(1, 2))
        cond = self.time_embed(timestep.reshape(-1, 1, 1) / 1000) + context.mean(1, keepdim=True)
        for block in self.fused_blocks:
            v, a = block(v, a, cond)
        v = self.video_out(v).transpose(1, 2).reshape(video.shape)
        return torch.stack([v, self.audio_out(a).transpose(1, 2).reshape(video.shape)])


class DreamIDOmniLikePipeline(_TinyPipeline):
    """DiT ``transformer`` with ``fused_blocks``; VAEs ``vae_model_video`` and ``vae_model_audio``."""

    _dit_modules = ["transformer"]
    _encoder_modules = ["text_encoder"]
    _vae_modules = ["vae_model_video", "vae_model_audio"]

    def __init__(self) -> None:
        torch.manual_seed(4)
        self.text_encoder = TinyTextEncoder()
        self.transformer = DreamIDTransformer()
        self.vae_model_video = TinyVAE()
        self.vae_model_audio = TinyAudioVAE()

    @torch.no_grad()
    def __call__(self, prompt_ids, num_inference_steps=2, generator=None, seed=0, size=4) -> torch.Tensor:
        context = self.text_encoder(prompt_ids.to(self.execution_device))
        # Video latents (1, C, H, W) and audio latents (1, C, H*W) stacked into one tensor for the loop.
        latents = self.noise((2, 1, LATENT, size, size), generator, seed)
        latents = self.denoise(
            lambda x, t, ctx: self.transformer(x, t[:1], ctx), latents, context, num_inference_steps
        )
        video = self.vae_model_video.decode(latents[0])
        audio = self.vae_model_audio.decode(latents[1].flatten(2))
        return torch.cat([video.flatten(1), audio.flatten(1)], dim=1)


# ----------------------------------------------------------------------------------------- standard names


class StandardNamesPipeline(_TinyPipeline):
    """Declares nothing: ``text_encoder``, ``transformer`` and ``vae`` are found by the name scan; the
    ``safety_checker`` lands in ``others``."""

    def __init__(self) -> None:
        torch.manual_seed(5)
        self.text_encoder = TinyTextEncoder()
        self.transformer = TinyDiT(layers=3, blocks_attr="transformer_blocks")
        self.vae = TinyVAE()
        self.safety_checker = nn.Linear(3, 1)

    @torch.no_grad()
    def __call__(self, prompt_ids, num_inference_steps=2, generator=None, seed=0, size=8) -> torch.Tensor:
        context = self.text_encoder(prompt_ids.to(self.execution_device))
        latents = self.noise((1, LATENT, size, size), generator, seed)
        latents = self.denoise(self.transformer, latents, context, num_inference_steps)
        image = self.vae.decode(latents)
        nsfw = self.safety_checker(image.mean((2, 3)))
        return image * (nsfw < 1e6).to(image.dtype).reshape(-1, 1, 1, 1)  # keeps the image, uses the checker


# -------------------------------------------------------------------------------------------------- registry


def build_omnigen2() -> tuple[OmniGen2LikePipeline, dict]:
    return OmniGen2LikePipeline(), _kwargs()


def build_bagel() -> tuple[BagelLikePipeline, dict]:
    return BagelLikePipeline(), _kwargs()


def build_ltx2_two_stages() -> tuple[LTX2TwoStagesLikePipeline, dict]:
    return LTX2TwoStagesLikePipeline(), _kwargs()


def build_mammothmoda2() -> tuple[MammothModa2LikePipeline, dict]:
    image = torch.Generator().manual_seed(7)
    return MammothModa2LikePipeline(), {
        "image": torch.rand(1, 3, 8, 8, generator=image),
        "num_inference_steps": 2,
        "seed": 0,
    }


def build_dreamid_omni() -> tuple[DreamIDOmniLikePipeline, dict]:
    return DreamIDOmniLikePipeline(), _kwargs()


def build_standard_names() -> tuple[StandardNamesPipeline, dict]:
    return StandardNamesPipeline(), _kwargs()


CUSTOM_PIPELINES: dict[str, Callable[[], tuple[object, dict]]] = {
    "omnigen2": build_omnigen2,
    "bagel": build_bagel,
    "ltx2_two_stages": build_ltx2_two_stages,
    "mammothmoda2": build_mammothmoda2,
    "dreamid_omni": build_dreamid_omni,
    "standard_names": build_standard_names,
}
