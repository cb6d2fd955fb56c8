"""The command line's shared pieces: the offload option group (every flag spelled once, in
:data:`OFFLOAD_FLAGS`), model loading, the demo's defaults, the exit codes, and the checks that run before a
model loads (missing extras, a busy port, the server's settings) or before it denoises (the size)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import Compression, OffloadConfig, OffloadMode
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


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected seconds ≥ 0, got {text}")
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
        "--ram-budget",
        {
            "aliases": ("--host-memory-limit",),
            "metavar": "SIZE",
            "help": "most host memory the weights' copies may take; below the weights, the pieces that move least "
            "stay mapped in their checkpoint files (pageable, counted by the planner) (alias --host-memory-limit)",
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
    "compression": (
        "--compression",
        {
            "choices": [c.value for c in Compression],
            "help": "keep moved weights losslessly compressed in host memory: auto (where the plan predicts a "
            "gain), off, lossless (every moved piece); needs vramferry[compress] (default: auto)",
        },
    ),
    "compression_cache": (
        "--compression-cache",
        {
            "metavar": "auto|off|DIR",
            "help": "compressed bytes written by 'vramferry compress': auto (in the model's folder), off, or the "
            "cache folder (default: auto)",
        },
    ),
    "share_host_store": (
        "--share-host-store",
        {
            "nargs": "?",
            "const": True,
            "metavar": "DIR",
            "help": "keep the weights' host copies in shared memory, one copy for every process on this machine "
            "that loads the same checkpoint (default folder /dev/shm; off unless given)",
        },
    ),
    "helper_devices": (
        "--helper-devices",
        {
            "type": _comma_list,
            "metavar": "DEVICES",
            "help": "other GPUs whose PCIe links carry part of every streamed block (e.g. cuda:1,cuda:2)",
        },
    ),
    "warm_up": (
        "--warm-up",
        {
            "action": _BOOL,
            "help": "run each kind of layer once on the GPU with scratch weights while the weights load, so that "
            "the first request starts with CUDA's kernels loaded (default: on)",
        },
    ),
}
"""OffloadConfig field → (flag, argparse options). The only place where offload flags are spelled."""


_DEST = "offload__"


def add_offload_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per :class:`OffloadConfig` field (see :data:`OFFLOAD_FLAGS`)."""
    group = parser.add_argument_group("offload (OffloadConfig fields; flags override --config)")
    group.add_argument("--config", metavar="FILE.json", help="load an OffloadConfig saved as JSON")
    for field_name, (flag, options) in OFFLOAD_FLAGS.items():
        options = dict(options)
        names = (flag, *options.pop("aliases", ()))
        group.add_argument(*names, dest=_DEST + field_name, default=argparse.SUPPRESS, **options)


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


BATCH_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "max_batch": (
        "--max-batch",
        {
            "type": _positive_int,
            "metavar": "N",
            "help": "the most images one pipeline call makes for queued requests that can share it (same size, "
            "steps, guidance, LoRA weights); on a GPU the planner may choose fewer; 1 turns batching off "
            "(default: {})",
        },
    ),
    "batch_wait": (
        "--batch-wait",
        {
            "type": _seconds,
            "metavar": "SECONDS",
            "help": "how long (0 to 60 s) the first request in the queue waits for others to share its call "
            "(default: {})",
        },
    ),
}
"""ServerSettings field → (flag, argparse options) for the server's batching; the defaults are ServerSettings'."""


def add_batch_options(parser: argparse.ArgumentParser) -> None:
    """Add one flag per batching field of ``ServerSettings`` (see :data:`BATCH_FLAGS`)."""
    from .server.settings import ServerSettings  # dataclasses only: no fastapi needed

    group = parser.add_argument_group("batching (ServerSettings fields)")
    for field_name, (flag, options) in BATCH_FLAGS.items():
        text = options["help"].format(getattr(ServerSettings, field_name))
        group.add_argument(flag, dest=field_name, default=argparse.SUPPRESS, **{**options, "help": text})


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


def load(args: argparse.Namespace, config: OffloadConfig | None = None) -> Any:
    """The pipeline named by ``--model`` (the demo when absent), on the CPU, built without reading its weights
    (:func:`~vramferry.loader.build_pipeline`). Given the ``config`` it is about to be offloaded with, the disk
    reads its files ahead and CUDA starts meanwhile, as in :func:`vramferry.load`."""
    from .loader import build_pipeline

    def build() -> Any:
        return build_pipeline(args.model, config, dtype=args.dtype)[0]

    if getattr(args, "verbose", False) or getattr(args, "debug", False):
        return build()
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return build()
    # transformers warns on import about optional backends (torchvision) that pipelines here never use.
    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return build()
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


def apply_offload(
    pipeline: Any, config: OffloadConfig, params: Any = None, progress: bool | None = None
) -> Any:
    """``vramferry.api.apply(pipeline, config)``, sized for ``params`` (a ``GenerationParams``) when given; a
    ``progress`` bar while the host store fills (``None``: with ``--verbose``).

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
    return apply(pipeline, config, workload=workload, progress=progress)


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


# -- checks made before a model loads or denoises ------------------------------------------------------------


def check_sizes(pipeline: Any, sizes: Sequence[tuple[int, int]], flag: str) -> None:
    """Reject, naming the nearest valid sizes, a ``(width, height)`` that ``pipeline`` cannot make: diffusers
    would round it down (``100x100`` gives ``96x96``) or fail at the end of denoising (``7x7``)."""
    from .server.generation import size_multiple

    multiple = size_multiple(pipeline)
    for width, height in sizes:
        if width % multiple == 0 and height % multiple == 0:
            continue
        below = tuple(max(multiple, side // multiple * multiple) for side in (width, height))
        above = tuple(-(-side // multiple) * multiple for side in (width, height))
        nearest = " or ".join(dict.fromkeys(f"{w}x{h}" for w, h in (below, above)))
        raise UsageError(
            f"{flag} {width}x{height}: {type(pipeline).__name__} makes sizes whose sides are multiples of "
            f"{multiple}; the nearest are {nearest}"
        )


def server_settings(args: argparse.Namespace, defaults: dict[str, Any]) -> Any:
    """The ``ServerSettings`` of the flags (validated there), built before any model loads."""
    from .server import ServerSettings

    has_size = "width" in defaults and "height" in defaults
    optional = {}
    if args.allowed_hosts is not None:
        if "allowed_hosts" not in {f.name for f in dataclasses.fields(ServerSettings)}:
            raise UsageError("--allowed-hosts: this version of the server has no allowed_hosts setting")
        optional["allowed_hosts"] = args.allowed_hosts
    optional.update({name: getattr(args, name) for name in BATCH_FLAGS if hasattr(args, name)})
    return ServerSettings(
        model_name=args.served_model_name or args.model or "vramferry-demo",
        api_key=args.api_key or os.environ.get("VRAMFERRY_API_KEY") or None,
        max_queue=args.max_queue,
        timeout=args.timeout,
        max_size=args.max_size,
        default_size=(min(defaults["width"], args.max_size), min(defaults["height"], args.max_size))
        if has_size
        else None,
        default_steps=defaults.get("steps"),
        default_guidance=defaults.get("guidance"),
        call_defaults=defaults.get("extra", {}),
        spool_dir=getattr(args, "spool_dir", None),
        video_retention=getattr(args, "video_retention", 3600.0),
        **optional,
    )


def check_port(host: str, port: int) -> None:
    """Bind ``host:port`` and let it go again, so that a busy port or a bad address is reported now."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as sock:
        # As uvicorn's own socket does: a port left in TIME_WAIT by an earlier server counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            busy = exc.errno == errno.EADDRINUSE
            fix = "stop what listens there or choose another --port" if busy else "check --host and --port"
            raise UsageError(
                f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); {fix}"
            ) from None


def require_extra(command: str, extra: str, modules: Sequence[str]) -> None:
    """Fail in one line, naming the extra that installs it, when a module that ``command`` needs is missing."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(
                f"vramferry {command} needs {module!r} ({exc}); install the '{extra}' extra: "
                f"pip install 'vramferry[{extra}]' (in a checkout: pip install -e \".[{extra}]\")"
            ) from exc


def _load_loras(pipeline: Any, adapters: Sequence[tuple[str, Path]]) -> None:
    from .server.lora import LoraError, load_lora_adapters

    try:
        load_lora_adapters(pipeline, adapters)
    except LoraError as exc:
        raise UsageError(f"--lora {exc}") from None


def _lora_spec(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` → ``(NAME, Path(PATH))``, the path checked now (before the model loads)."""
    from .server.lora import ADAPTER_NAME

    name, sep, path = text.partition("=")
    if not sep or not ADAPTER_NAME.fullmatch(name) or not path:
        raise argparse.ArgumentTypeError(
            f"expected NAME=PATH (NAME of letters, digits, '_' or '-'), such as style=/loras/style, got {text!r}"
        )
    if not Path(path).exists():
        raise argparse.ArgumentTypeError(
            f"{name}: {path} does not exist; give a local LoRA folder or .safetensors file"
        )
    return name, Path(path)


def check_lora_names(adapters: Sequence[tuple[str, Any]]) -> None:
    """Each ``--lora`` NAME once, checked before the model loads."""
    names = [name for name, _ in adapters]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"--lora: {', '.join(twice)} named twice; give each adapter its own NAME")


def compression_ratios(args: argparse.Namespace, config: OffloadConfig, modules: Any) -> dict[str, float] | None:
    """For ``vramferry plan``: the compression ratios to price, estimated from the weights where they can be
    read (the dtype's default otherwise), when compression was asked for (``--compression`` or a config file);
    ``None`` leaves compression out of the plan, as when no codec is installed."""
    asked = "compression" in given_offload_options(args) or config.compression is not Compression.AUTO
    if not asked or config.compression is Compression.OFF:
        return None
    from .runtime.codecs import estimated_ratios

    return estimated_ratios(modules)


def assumed_device(result: Any, profile: Any) -> Any:
    """``result`` (a plan) with its device note marked as assumed, naming the flag that chooses another GPU."""
    head = f"device: {profile.name},"
    mark = " (assumed: pass --gpu for another GPU)"
    notes = tuple(note + mark if note.startswith(head) else note for note in result.notes)
    if notes == result.notes:
        notes = (*notes, f"device: {profile.name}{mark}")
    return dataclasses.replace(result, notes=notes)
