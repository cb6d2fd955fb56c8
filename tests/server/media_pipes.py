"""Tiny real pipelines for the media routes: an image-to-image Flux and a Wan text-to-video, built from the test bed's
components (random weights, no files)."""

from __future__ import annotations

from typing import Any

from pipelines.diffusers_pipes import build_flux, build_wan


def build_flux_img2img() -> Any:
    """diffusers' FluxImg2ImgPipeline over the tiny Flux's own modules (32x32 by default, 16-pixel granularity)."""
    import diffusers

    flux, _ = build_flux()
    pipe = diffusers.FluxImg2ImgPipeline(
        **{
            name: flux.components[name]
            for name in (
                "scheduler",
                "vae",
                "text_encoder",
                "tokenizer",
                "text_encoder_2",
                "tokenizer_2",
                "transformer",
            )
        }
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_wan() -> Any:
    """The test bed's two-expert WanPipeline (16-pixel granularity, 4k+1 frames)."""
    pipe, _ = build_wan()
    return pipe
