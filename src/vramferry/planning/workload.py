"""One request's shape: what the planner sizes activations and compute for."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..discovery.shapes import DitShape

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class Workload:
    """One request: the output size, the sampler and, optionally, measured block times.

    Attributes:
        height, width, num_frames: output size (``num_frames`` = 1 for images).
        batch: samples per DiT call (images per prompt).
        cfg: DiT calls per denoising step: 2 when the guided and unguided branches run as separate calls
            (Wan, Qwen-Image with a negative prompt), 1 for guidance-distilled models (Flux.1-dev).
        steps: denoising steps.
        text_tokens: prompt tokens after padding (Flux's T5: 512).
        block_compute_s: measured compute seconds per block and call, per DiT name: one number for every
            block, or one per block in execution order. Replaces the FLOP estimate.
    """

    height: int = 1024
    width: int = 1024
    num_frames: int = 1
    batch: int = 1
    cfg: int = 1
    steps: int = 28
    text_tokens: int = 512
    block_compute_s: Mapping[str, float | tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("height", "width", "num_frames", "batch", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a whole number ≥ 1, got {value!r}")
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg: DiT calls per step must be 1 or 2, got {self.cfg!r}")
        if (
            isinstance(self.text_tokens, bool)
            or not isinstance(self.text_tokens, int)
            or self.text_tokens < 0
        ):
            raise ValueError(f"text_tokens: must be a whole number ≥ 0, got {self.text_tokens!r}")
        times = {}
        for dit, value in dict(self.block_compute_s).items():
            values = (value,) if isinstance(value, (int, float)) else tuple(value)
            if not values or any(isinstance(v, bool) or not v >= 0 for v in values):
                raise ValueError(f"block_compute_s[{dit!r}]: must be seconds ≥ 0, got {value!r}")
            times[str(dit)] = (
                float(values[0]) if isinstance(value, (int, float)) else tuple(map(float, values))
            )
        object.__setattr__(self, "block_compute_s", times)

    def sequence_length(
        self,
        spatial_factor: int = 8,
        patch: int = 2,
        *,
        temporal_factor: int = 1,
        temporal_patch: int = 1,
        joint_text: bool = True,
    ) -> int:
        """Tokens in one sample's DiT sequence (image or video tokens, plus text when it joins the sequence)."""
        side = spatial_factor * patch
        image = math.ceil(self.height / side) * math.ceil(self.width / side)
        frames = 1
        if self.num_frames > 1:
            latent_frames = (self.num_frames - 1) // max(temporal_factor, 1) + 1
            frames = math.ceil(latent_frames / max(temporal_patch, 1))
        return image * frames + (self.text_tokens if joint_text else 0)

    def tokens_per_call(self, spatial_factor: int = 8, patch: int = 2, **video: int | bool) -> int:
        """Tokens a DiT call pushes through its linear layers: the sequence length times ``batch``.

        ``video`` takes ``temporal_factor``, ``temporal_patch`` and ``joint_text`` as in :meth:`sequence_length`.
        """
        return self.sequence_length(spatial_factor, patch, **video) * self.batch  # type: ignore[arg-type]

    def sequence_of(self, shape: DitShape) -> int:
        return self.sequence_length(
            shape.spatial_factor,
            shape.patch,
            temporal_factor=shape.temporal_factor,
            temporal_patch=shape.temporal_patch,
            joint_text=shape.joint_text,
        )

    def dit_calls(self) -> int:
        """DiT forward calls per request (all DiTs together)."""
        return self.steps * self.cfg
