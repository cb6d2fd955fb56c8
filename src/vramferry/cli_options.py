"""The command line's shared pieces: the offload option group (every flag spelled once, in
:data:`OFFLOAD_FLAGS`), model loading, the demo's defaults and the exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .config import OffloadConfig, OffloadMode
from .errors import OffloadError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad command line: reported as one line, exit code 2."""


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _block_attrs(text: str) -> tuple[str, tuple[str, ...]]:
    dit, sep, attrs = text.partition("=")
    if not sep or not dit.strip() or not _comma_list(attrs):
        raise argparse.ArgumentTypeError(f"expected DIT=ATTR[,ATTR...], got {text!r}")
    return dit.strip(), _comma_list(attrs)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 1, got {value}")
    return value


_BOOL = argparse.BooleanOptionalAction


OFFLOAD_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "mode": (
        "--offload",
        {"choices": [m.value for m in OffloadMode], "help": "placement strategy (default: auto)"},
    ),
    "vram_budget": (
        "--vram-budget",
        {"metavar": "SIZE", "help": "device memory the pipeline may use: 24GiB, 16GB, 80%% of free memory"},
    ),
    "onload_device": (
        "--onload-device",
        {"metavar": "DEVICE", "help": "execution device (default: cuda; cpu when CUDA is unavailable)"},
    ),
    "pin_memory": ("--pin-memory", {"action": _BOOL, "help": "page-locked host copies (default: on)"}),
    "host_memory_limit": (
        "--host-memory-limit",
        {
            "metavar": "SIZE",
            "help": "most host bytes to page-lock; beyond it copies go through pageable memory",
        },
    ),
    "prefetch_components": (
        "--prefetch-components",
        {"action": _BOOL, "help": "load the next component while the current one computes (default: on)"},
    ),
    "prefetch_depth": (
        "--prefetch-depth",
        {
            "type": _positive_int,
            "metavar": "N",
            "help": "layerwise look-ahead in blocks (default: automatic)",
        },
    ),
    "keep_resident": (
        "--keep-resident",
        {"type": _comma_list, "metavar": "NAMES", "help": "comma-separated components kept on the device"},
    ),
    "order": (
        "--order",
        {
            "type": _comma_list,
            "metavar": "NAMES",
            "help": "components in the order a request runs them, overriding discovery (e.g. transformer,vae)",
        },
    ),
    "block_attrs": (
        "--block-attrs",
        {
            "type": _block_attrs,
            "action": "append",
            "metavar": "DIT=ATTR[,ATTR]",
            "help": "a DiT's block lists in execution order, overriding discovery (repeatable)",
        },
    ),
    "safety_margin": (
        "--safety-margin",
        {"metavar": "SIZE", "help": "memory left free when no budget is given (default: 1GiB)"},
    ),
    "verify": (
        "--verify",
        {"action": _BOOL, "help": "check every module's weights are on the device before it runs"},
    ),
    "strict": ("--strict", {"action": _BOOL, "help": "turn discovery warnings into errors"}),
}
"""OffloadConfig field → (flag, argparse options). The only place where offload flags are spelled."""


_DEST = "offload__"


def add_offload_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per :class:`OffloadConfig` field (see :data:`OFFLOAD_FLAGS`)."""
    group = parser.add_argument_group("offload (OffloadConfig fields; flags override --config)")
    group.add_argument("--config", metavar="FILE.json", help="load an OffloadConfig saved as JSON")
    for field_name, (flag, options) in OFFLOAD_FLAGS.items():
        group.add_argument(flag, dest=_DEST + field_name, default=argparse.SUPPRESS, **options)


def given_offload_options(args: argparse.Namespace) -> dict[str, Any]:
    """The offload fields set on the command line (not those from ``--config`` or defaults)."""
    given = {name[len(_DEST) :]: value for name, value in vars(args).items() if name.startswith(_DEST)}
    if "block_attrs" in given:
        given["block_attrs"] = dict(given["block_attrs"])
    return given


def offload_config(args: argparse.Namespace) -> OffloadConfig:
    """``--config`` (if any) with the flags on top, validated by :class:`OffloadConfig`."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise UsageError(f"--config: cannot read {str(path)!r}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"--config: {str(path)!r} is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError(f"--config: {str(path)!r} must hold a JSON object")
    data.update(given_offload_options(args))
    return OffloadConfig.from_dict(data)


def fit_to_machine(config: OffloadConfig) -> OffloadConfig:
    """Run on the CPU, with a one-line note, when the config targets CUDA and there is none."""
    import torch

    if config.device.type == "cuda" and not torch.cuda.is_available():
        print("note: CUDA is not available; running on the CPU (onload_device='cpu')", file=sys.stderr)
        return config.replace(onload_device="cpu")
    return config


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="PATH_OR_ID",
        help="diffusers pipeline folder or Hub id (default: the built-in demo)",
    )
    parser.add_argument(
        "--dtype", help="weights' dtype: float32, float16 or bfloat16 (default: the model's own)"
    )


def load(args: argparse.Namespace) -> Any:
    """The pipeline named by ``--model`` (the demo when absent), on the CPU."""
    from .pipelines.loading import load_pipeline

    if getattr(args, "verbose", False) or getattr(args, "debug", False):
        return load_pipeline(args.model, dtype=args.dtype)
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return load_pipeline(args.model, dtype=args.dtype)
    # transformers warns on import about optional backends (torchvision) that pipelines here never use.
    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return load_pipeline(args.model, dtype=args.dtype)
    finally:
        transformers_logging.set_verbosity(previous)


def demo_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's prompt, size, steps and guidance when ``--model`` is absent, else nothing.

    Keys are ``GenerationParams`` fields; the demo's other call arguments are under ``"extra"``.
    """
    if getattr(args, "model", None) is not None:
        return {}
    from .pipelines.demo import DEMO_DEFAULTS

    names = {"num_inference_steps": "steps", "guidance_scale": "guidance", "num_frames": "frames"}
    known = {"prompt", "negative_prompt", "height", "width", *names.values()}
    defaults: dict[str, Any] = {"extra": {}}
    for key, value in DEMO_DEFAULTS.items():
        key = names.get(key, key)
        if key in known:
            defaults[key] = value
        else:
            defaults["extra"][key] = value
    return defaults


def apply_offload(pipeline: Any, config: OffloadConfig, params: Any = None) -> Any:
    """``vramferry.api.apply(pipeline, config)``, sized for ``params`` (a ``GenerationParams``) when given.

    Without the offload runtime, mode ``none`` falls back to a plain ``pipeline.to(device)`` (returns ``None``).
    """
    from . import api

    apply = getattr(api, "apply", None)
    if apply is None:
        if config.mode is OffloadMode.NONE:
            pipeline.to(config.onload_device)
            return None
        raise OffloadError(
            f"--offload {config.mode.value}: the offload runtime is not available in this build"
        )
    from .server.generation import request_workload

    workload = request_workload(params) if params is not None else None
    return apply(pipeline, config) if workload is None else apply(pipeline, config, workload=workload)


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` → ``(1024, 768)`` (width, height)."""
    width, sep, height = text.lower().replace("×", "x").partition("x")
    try:
        size = (int(width), int(height)) if sep else None
    except ValueError:
        size = None
    if size is None or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1024x1024, got {text!r}")
    return size
