"""The geometry a component's cost depends on, read from its config and parameter names."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class DitShape:
    """The geometry of a DiT that its cost depends on.

    Attributes:
        hidden_size: model width ``d``.
        ffn_size: widest feed-forward width (``4·d`` when unknown).
        spatial_factor, patch: pixels per latent (VAE downsampling) and latents per token side.
        temporal_factor, temporal_patch: frames per latent frame and latent frames per token (video).
        joint_text: text tokens join the image sequence (Flux, Qwen-Image) rather than cross-attention (Wan).
        text_bytes, mod_bytes: per block, the weight bytes that see only the text tokens (a dual-stream block's
            text stream, cross-attention K/V) and only the timestep (adaLN modulation); empty when unknown.
    """

    hidden_size: int
    ffn_size: int | None = None
    spatial_factor: int = 8
    patch: int = 2
    temporal_factor: int = 1
    temporal_patch: int = 1
    joint_text: bool = True
    text_bytes: tuple[int, ...] = ()
    mod_bytes: tuple[int, ...] = ()

    @property
    def ffn(self) -> int:
        return self.ffn_size or 4 * self.hidden_size


@dataclass(frozen=True)
class VaeShape:
    """What a VAE decode's workspace depends on: its top-level width, and for a causal video VAE (Wan's,
    Qwen-Image's) how many frames it decodes at once."""

    base_channels: int = 128
    frames_per_chunk: int = 1
    video: bool = False


def itemsize_of(dtype: str) -> int:
    """Bytes per element of a dtype written as ``"torch.bfloat16"`` (2 when unknown)."""
    value = getattr(torch, dtype.rpartition(".")[2], None)
    return value.itemsize if isinstance(value, torch.dtype) else 2


def dit_shape_from_config(cfg: Mapping[str, Any], block_bytes: Sequence[int], itemsize: int = 2) -> DitShape:
    """A DiT's geometry from its diffusers config; the width guessed from block size (≈ 12·d² params) otherwise."""
    heads, head_dim = cfg.get("num_attention_heads"), cfg.get("attention_head_dim")
    hidden = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else None
    hidden = hidden or cfg.get("hidden_size") or cfg.get("inner_dim") or cfg.get("dim")
    if not isinstance(hidden, int) or hidden <= 0:
        hidden = round(math.sqrt(max(block_bytes) / itemsize / 12)) if block_bytes else 3072
    ffn = cfg.get("ffn_dim") if isinstance(cfg.get("ffn_dim"), int) else None
    patch = cfg.get("patch_size", 2)
    if isinstance(patch, (list, tuple)) and len(patch) == 3:  # (t, h, w): a video DiT with cross-attention
        return DitShape(
            hidden,
            ffn,
            patch=int(patch[1]),
            temporal_factor=4,
            temporal_patch=int(patch[0]),
            joint_text=False,
        )
    # Flux (patch_size 1) and Qwen-Image (2) both see 2×2 packed latents: 16 pixels per token side.
    return DitShape(hidden, ffn, patch=max(int(patch), 2) if isinstance(patch, int) else 2)


def vae_shape_from_config(cfg: Mapping[str, Any]) -> VaeShape:
    """A VAE's decoder width (``base_dim`` or ``block_out_channels[0]``) and, for video VAEs, 4 frames a chunk."""
    base = cfg.get("base_dim") or (list(cfg.get("block_out_channels") or [128]) or [128])[0]
    video = "temperal_downsample" in cfg or "temporal_compression_ratio" in cfg
    return VaeShape(int(base), 4 if video else 1, video)


# Parameter names of weights that see only the text tokens, and only the timestep (adaLN modulation).
_TEXT_ONLY = re.compile(
    r"(^|\.)(\w*context\w*|txt_\w+|add_[qkv]_proj|to_add_out|norm_added_\w+|attn2\.to_[kv])\."
)


_MODULATION = re.compile(r"(^|\.)(norm\w*\.linear|\w*_mod|adaLN\w*|scale_shift_table)(\.|$)")


def token_split(blocks: Sequence[torch.nn.Module]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per block, the bytes of text-only weights and of modulation weights, told apart by name."""
    text, mod = [], []
    for block in blocks:
        t = m = 0
        for name, p in block.named_parameters():
            nbytes = p.numel() * p.element_size()
            if _MODULATION.search(name):
                m += nbytes
            elif _TEXT_ONLY.search(name):
                t += nbytes
        text.append(t)
        mod.append(m)
    return tuple(text), tuple(mod)
