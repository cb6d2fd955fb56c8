"""What one server accepts, how long it waits, and where its videos go."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ServerSettings:
    """What the server accepts and how long it waits.

    Attributes:
        model_name: the id served by ``/v1/models``; a request's ``model``, when given, must equal it.
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``.
        max_queue: requests that may wait for the worker; more are answered 429.
        timeout: seconds a request may take, queueing included; then 504 (a request that has not started is
            not run; one that has is aborted at its next denoising step).
        max_size, min_size: bounds of each image side, in pixels.
        size_multiple: what sides must be a multiple of; ``None`` takes it from the pipeline (twice the VAE's
            scale factor, 16 for Flux).
        max_prompt_chars: the longest prompt (and negative prompt) accepted.
        default_size: ``(width, height)`` used when a request gives no size; ``None`` leaves it to the pipeline.
        default_steps, default_guidance: used when a request omits them; ``None`` leaves them to the pipeline.
        max_body_bytes: the largest request body read; a larger one is answered 413 as soon as the bytes read
            pass it (chunked bodies included) or at once when its ``Content-Length`` does.
        call_defaults: further keyword arguments for every pipeline call (``{"max_sequence_length": 64}``).
        allowed_hosts: the ``Host`` header values served (names or addresses, without port; ``"*.example.com"``
            matches its subdomains; ``"*"`` any host); others are answered 400. ``None`` (the default): a request
            that arrives on a loopback address must name a loopback host (``localhost``, ``127.0.0.1``, ``::1``),
            which stops DNS-rebinding pages from reaching a server bound to loopback; one that arrives on a network
            address is not checked (set this when serving on a network).
        header_timeout: seconds a connection may take to send a request's headers (the connection is closed
            then); applied by the uvicorn options of :func:`vramferry.server.uvicorn_options`.
        max_upload_bytes: the largest body of the multipart routes (image edits, videos with an input image).
        max_upload_pixels: the most pixels an uploaded image may have (checked from its header, before decoding).
        max_frames: the most frames a video request may ask for.
        default_fps: a video's frame rate when a request gives none.
        video_timeout: seconds a video job may take, queueing included; then it fails with ``timeout``.
        spool_dir: where finished videos are written; ``None``: a temporary folder made at start, removed at stop.
        spool_max_bytes: the most bytes the finished videos may take; past it the oldest are deleted.
        video_retention: seconds a finished video (and its job) is kept; then both are deleted.
        max_video_jobs: jobs remembered (waiting, running and finished); past it the oldest finished are deleted,
            and when all are unfinished a new one is answered 429.
        max_batch: the most images one pipeline call makes for several queued image requests that can share it
            (same size, steps, guidance, LoRA weights; prompts, negative prompts and seeds may differ). On a GPU
            the planner may choose fewer (the largest batch that fits the budget and still raises images per
            second); 1 turns batching off, each request is then its own call.
        batch_wait: seconds a request may wait, once it is first in the queue, for others to share its call (it
            never waits longer for company; 0: batch only what is already queued).
    """

    model_name: str = "vramferry"
    api_key: str | None = None
    max_queue: int = 8
    timeout: float = 300.0
    max_size: int = 2048
    min_size: int = 64
    size_multiple: int | None = None
    max_prompt_chars: int = 4096
    default_size: tuple[int, int] | None = None
    default_steps: int | None = None
    default_guidance: float | None = None
    max_body_bytes: int = 1 << 20
    call_defaults: Mapping[str, Any] = field(default_factory=dict)
    allowed_hosts: tuple[str, ...] | None = None
    header_timeout: float = 10.0
    max_upload_bytes: int = 20 << 20
    max_upload_pixels: int = 4096 * 4096
    max_frames: int = 257
    default_fps: int = 16
    video_timeout: float = 3600.0
    spool_dir: Path | None = None
    spool_max_bytes: int = 2 << 30
    video_retention: float = 3600.0
    max_video_jobs: int = 64
    max_batch: int = 8
    batch_wait: float = 0.03

    def __post_init__(self) -> None:
        if self.allowed_hosts is not None:
            if isinstance(self.allowed_hosts, str):
                raise ValueError(
                    f"allowed_hosts: must be a sequence of names, got the string {self.allowed_hosts!r}"
                )
            hosts = tuple(host.strip().lower() for host in self.allowed_hosts)
            if not hosts or not all(hosts):
                raise ValueError(f"allowed_hosts: must name at least one host, got {self.allowed_hosts!r}")
            object.__setattr__(self, "allowed_hosts", hosts)  # a list given is kept as a tuple (hashable)
        if not self.header_timeout > 0:
            raise ValueError(f"header_timeout: must be positive, got {self.header_timeout}")
        for name in (
            "max_upload_bytes",
            "max_upload_pixels",
            "max_frames",
            "default_fps",
            "max_video_jobs",
            "max_batch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("video_timeout", "video_retention", "spool_max_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0 <= self.batch_wait <= 60:  # NaN fails too
            raise ValueError(f"batch_wait: must be 0 to 60 seconds, got {self.batch_wait}")
        if self.spool_dir is not None:
            object.__setattr__(self, "spool_dir", Path(self.spool_dir))
        if self.max_body_bytes < 0:
            raise ValueError(f"max_body_bytes: must not be negative, got {self.max_body_bytes}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue: must be at least 1, got {self.max_queue}")
        if not self.timeout > 0:
            raise ValueError(f"timeout: must be positive, got {self.timeout}")
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"max_size: must be at least min_size ({self.min_size}), got {self.max_size}")
        if self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars: must be at least 1, got {self.max_prompt_chars}")
        if self.default_size is not None and not all(
            self.min_size <= side <= self.max_size for side in self.default_size
        ):
            raise ValueError(
                f"default_size: {self.default_size} is outside [{self.min_size}, {self.max_size}] pixels"
            )
