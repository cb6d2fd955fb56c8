"""Helpers of ``vramferry generate``: its parameters from the command line, the progress bar, the output path."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .cli_options import UsageError


def generation_params(args: argparse.Namespace, defaults: dict[str, Any]) -> Any:
    from .server.generation import GenerationParams

    size = args.size or (defaults.get("width"), defaults.get("height"))
    prompt = args.prompt if args.prompt is not None else defaults.get("prompt")
    if not prompt:
        raise UsageError("--prompt is required with --model")
    return GenerationParams(
        prompt=prompt,
        negative_prompt=args.negative_prompt
        if args.negative_prompt is not None
        else defaults.get("negative_prompt"),
        steps=args.steps if args.steps is not None else defaults.get("steps"),
        width=size[0],
        height=size[1],
        guidance=args.guidance if args.guidance is not None else defaults.get("guidance"),
        seed=args.seed,
        frames=args.frames if args.frames is not None else defaults.get("frames"),
        extra=defaults.get("extra", {}),
    )


class Progress:
    """A tqdm bar over denoising steps, fed by the pipeline's ``callback_on_step_end``."""

    def __init__(self, pipeline: Any, enabled: bool, total: int | None = None) -> None:
        from tqdm.auto import tqdm

        from .server.generation import call_parameters, disable_progress_bar

        self.bar = None
        if enabled and "callback_on_step_end" in call_parameters(pipeline):
            disable_progress_bar(pipeline)  # ours replaces the pipeline's own bar
            self.bar = tqdm(desc="denoising", total=total, unit="step", file=sys.stderr, leave=True)
        elif not enabled:
            disable_progress_bar(pipeline)

    def __call__(self, step: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def output_path(args: argparse.Namespace, pipeline: Any) -> Path:
    """``--out``, or ``vramferry.mp4`` for a video pipeline and ``vramferry.png`` for an image one.

    Raises:
        UsageError: a video suffix (.mp4, .webm, .gif) for an image pipeline.
    """
    from .server.generation import is_video_pipeline
    from .server.media import VIDEO_SUFFIXES

    video = is_video_pipeline(pipeline)
    if args.out is None:
        return Path("vramferry.mp4" if video else "vramferry.png")
    out = Path(args.out)
    if not video and out.suffix.lower() in (".mp4", ".webm"):
        raise UsageError(
            f"--out {out}: {type(pipeline).__name__} makes images; give an image suffix (.png, .jpg, .webp)"
        )
    if video and out.suffix.lower() in VIDEO_SUFFIXES and out.suffix.lower() != ".gif":
        _require_pyav(out)
    return out


def _require_pyav(out: Path) -> None:
    try:
        import av  # noqa: F401
    except ImportError:
        raise UsageError(
            f"--out {out}: writing {out.suffix} needs PyAV: pip install av (in the 'cli' extra)"
        ) from None
