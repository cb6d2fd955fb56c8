"""The ``vramferry`` command: ``plan``, ``generate``, ``bench``, ``serve`` (``--replicas``: cli_replicas.py) and
``compress`` (cli_compress.py).
Every offload flag maps to one :class:`~vramferry.config.OffloadConfig` field through :data:`~vramferry.cli_options.OFFLOAD_FLAGS`, the
single option group that all commands share; ``--config FILE.json`` loads a saved config and flags override it.
Library errors become one ``error: ...`` line on stderr and exit code 2 (tracebacks with ``--debug``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .cli_compress import add_compress
from .cli_options import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    _add_model_options,
    _comma_list,
    _load_loras,
    _lora_spec,
    _port,
    _positive_int,
    add_batch_options,
    add_offload_options,
    apply_offload,
    assumed_device,
    check_lora_names,
    check_port,
    check_sizes,
    compression_ratios,
    demo_defaults,
    fit_to_machine,
    given_offload_options,
    load,
    offload_config,
    parse_size,
    require_extra,
    server_settings,
)
from .cli_replicas import add_replica_options, note_unprotected, replicated, serve_replicas
from .config import OffloadConfig, OffloadMode
from .errors import OffloadError

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (``error: ...``), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


# -- plan ----------------------------------------------------------------------------------------------------


def _plan_source(args: argparse.Namespace, config: OffloadConfig) -> tuple[Any, Any, Any]:
    """``(modules, inventory, workload)`` for ``--arch`` or ``--model`` (or the demo)."""
    shape = {
        "height": args.height,
        "width": args.width,
        "num_frames": args.frames,
        "steps": args.steps,
        "batch": args.batch,
    }
    shape = {key: value for key, value in shape.items() if value is not None}
    if args.arch:
        from .planning.archs import get_arch

        spec = get_arch(args.arch)
        return spec.modules(), spec.inventory(), spec.with_workload(**shape)
    from .discovery.inventory import inventory_of
    from .discovery.roles import discover
    from .planning.workload import Workload

    pipeline = load(args)
    modules = discover(pipeline, strict=config.strict, block_attrs=dict(config.block_attrs) or None)
    inventory = inventory_of(modules, config.order or None)
    defaults = demo_defaults(args)
    base = {key: defaults[key] for key in ("height", "width", "steps") if key in defaults}
    return modules, inventory, Workload(**{**base, **shape})


def _device_given(args: argparse.Namespace) -> bool:
    return bool(args.gpu or args.bandwidth or args.tflops or args.gpu_memory)


def _device_profile(args: argparse.Namespace) -> Any:
    """The device to plan for: ``--gpu``/``--bandwidth``/``--tflops``/``--gpu-memory``, else the planner's default
    preset (h100), so that a plan without ``--gpu`` is the plan of ``--gpu h100``."""
    from .planning.devices import profile_from
    from .runtime.probe import expandable_segments

    profile = profile_from(gpu=args.gpu, bandwidth=args.bandwidth, tflops=args.tflops, memory=args.gpu_memory)
    # The plan is for a run of this process's allocator settings (which main() sets, unless the user did).
    return dataclasses.replace(profile, expandable_segments=expandable_segments())


def cmd_plan(args: argparse.Namespace) -> int:
    from .discovery.describe import discovery_report, format_discovery

    if args.arch == "list":
        from .planning.archs import ARCHS

        width = max(len(name) for name in ARCHS)
        print("\n".join(f"{name.ljust(width)}  {spec.description}" for name, spec in ARCHS.items()))
        return EXIT_OK
    config = offload_config(args)
    modules, inventory, workload = _plan_source(args, config)
    data = discovery_report(modules, inventory)
    wants_plan = bool(given_offload_options(args) or args.config or _device_given(args) or args.throughput)
    text = format_discovery(data)
    if wants_plan:
        from .planning.format import format_plan
        from .planning.plan import plan_to_dict
        from .planning.planner import plan

        profile = _device_profile(args)
        ratios = compression_ratios(args, config, modules)
        result = plan(inventory, config, device=profile, workload=workload, compression_ratios=ratios)
        if not _device_given(args):
            result = assumed_device(result, profile)
        data["config"] = config.to_dict()
        data["workload"] = dataclasses.asdict(workload)
        data["plan"] = plan_to_dict(result)
        text += "\n\n" + format_plan(result, inventory)
        if args.throughput:
            from .planning.throughput import format_throughput, throughput

            points = throughput(
                lambda w: plan(inventory, config, device=profile, workload=w, compression_ratios=ratios),
                workload,
                args.throughput,
            )
            data["throughput"] = [{**dataclasses.asdict(p), "images_per_s": p.images_per_s} for p in points]
            text += "\n\nthroughput by batch size (predicted):\n" + format_throughput(points)
    print(json.dumps(data, indent=2, default=str) if args.json else text)
    return EXIT_OK


# -- generate ------------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from .cli_generate import Progress, generation_params, output_path
    from .report import PeakMemory, RunRecord, format_table
    from .server.generation import generate, save_outputs

    params = generation_params(args, demo_defaults(args))  # a bad command line fails before the model loads
    config = fit_to_machine(offload_config(args))
    pipeline = load(args, config)
    if params.width is not None and params.height is not None:
        check_sizes(pipeline, [(params.width, params.height)], "--size")
    out = output_path(args, pipeline)
    handle = apply_offload(pipeline, config, params, progress=not args.quiet)
    progress = Progress(pipeline, enabled=not args.quiet, total=params.steps)
    try:
        with PeakMemory(config.device) as peak:
            start = time.perf_counter()
            outputs = generate(pipeline, params, on_step=progress)
            seconds = time.perf_counter() - start
    finally:
        progress.close()
    record = RunRecord(
        label=config.mode.value,
        device=str(config.device),
        seconds=seconds,
        peak_allocated=peak.allocated,
        peak_reserved=peak.reserved,
    )
    if handle is not None:
        record.apply_stats(handle.stats())
    written = save_outputs(outputs, out, fps=args.fps)
    shown = str(written[0]) if len(written) == 1 else f"{len(written)} files, {written[0]} ... {written[-1]}"
    print(f"wrote {shown}")
    print(format_table([record]))
    return EXIT_OK


# -- serve ---------------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    require_extra("serve", "server", ("fastapi", "uvicorn", "pydantic", "prometheus_client"))
    import uvicorn

    from .server import create_app, uvicorn_options

    config = fit_to_machine(offload_config(args))
    too_big = [f"{w}x{h}" for w, h in args.sizes or () if max(w, h) > args.max_size]
    if too_big:
        raise UsageError(f"--sizes: {', '.join(too_big)} exceed --max-size {args.max_size}")
    check_lora_names(args.lora or ())
    defaults = demo_defaults(args)
    settings = server_settings(args, defaults)
    if replicated(args):
        return serve_replicas(args, settings)
    check_port(args.host, args.port)  # before the model loads: a busy port costs nothing
    pipeline = load(args, config)
    check_sizes(pipeline, args.sizes or (), "--sizes")
    _load_loras(pipeline, args.lora or ())  # before offload: an offloaded pipeline takes no adapters
    handle = apply_offload(pipeline, config)
    if args.sizes:
        _prepare_sizes(handle, args.sizes, defaults)
    app = create_app(pipeline, handle, settings)
    note_unprotected(args.host, settings)
    log_level = "debug" if args.debug else "info"
    uvicorn.run(app, host=args.host, port=args.port, log_level=log_level, **uvicorn_options(settings))
    return EXIT_OK


def _prepare_sizes(handle: Any, sizes: Sequence[tuple[int, int]], defaults: dict[str, Any]) -> None:
    """Plan every size in ``sizes`` now (auto mode), so that switching between them later costs no planning, and
    list the plans (``GET /v1/plans`` serves the same list)."""
    from .planning.format import format_size
    from .planning.workload import Workload

    if handle is None or str(handle.config.mode) != "auto":
        print("note: --sizes plans only in --offload auto; ignored", file=sys.stderr)
        return
    steps = defaults.get("steps") or handle.workload.steps
    plans = handle.prepare([Workload(height=h, width=w, steps=steps) for w, h in sizes])
    for (w, h), made in zip(sizes, plans, strict=True):
        step = f"{made.predicted_step_s:.3f} s/step" if made.predicted_step_s is not None else "step n/a"
        peak = f"{format_size(made.predicted_peak_bytes)} peak" if made.predicted_peak_bytes else "peak n/a"
        print(f"planned {w}x{h}: {step}, {peak}", file=sys.stderr)


# -- bench ---------------------------------------------------------------------------------------------------


def _runner(pipeline: Any, params: Any) -> Any:
    from .server.generation import generate

    return lambda: generate(pipeline, params)


def _release_memory(pipeline: Any) -> None:
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def _bench_mode(pipeline: Any, params: Any, config: OffloadConfig, repeats: int) -> tuple[Any, list]:
    from .report import measure

    handle = apply_offload(pipeline, config, params)
    try:
        stats = handle.stats if handle is not None else None
        record, trace = measure(config.mode.value, _runner(pipeline, params), config.device, repeats, stats)
        if handle is not None and getattr(handle, "plan", None) is not None:
            plan = handle.plan
            record.extra["predicted_peak_bytes"] = plan.predicted_peak_bytes
            record.extra["predicted_request_s"] = plan.predicted_request_s
        return record, trace
    finally:
        if handle is not None:
            handle.remove()
        else:
            pipeline.to("cpu")
        _release_memory(pipeline)


def _bench_diffusers(pipeline: Any, params: Any, device: Any, repeats: int) -> list[tuple[Any, list]]:
    """diffusers' model offload, then its block-level group offload (left installed: it cannot be undone)."""
    from .report import measure

    results = []
    if callable(getattr(pipeline, "enable_model_cpu_offload", None)):
        pipeline.enable_model_cpu_offload(device=device)
        results.append(measure("diffusers model offload", _runner(pipeline, params), device, repeats))
        pipeline.remove_all_hooks()
        pipeline.to("cpu")
        _release_memory(pipeline)
    if callable(getattr(pipeline, "enable_group_offload", None)):
        pipeline.enable_group_offload(
            onload_device=device, offload_type="block_level", num_blocks_per_group=1, use_stream=True
        )
        results.append(measure("diffusers group offload", _runner(pipeline, params), device, repeats))
    return results


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .report import format_table, plot_memory, write_json, write_markdown
    from .server.generation import disable_progress_bar

    if not torch.cuda.is_available():
        print(
            "error: vramferry bench needs a CUDA GPU, and none is visible (torch.cuda.is_available() is False)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if "mode" in given_offload_options(args):
        raise UsageError("bench: choose the modes with --modes, not --offload")
    require_extra("bench", "bench", ("matplotlib",))
    modes = [OffloadMode(m) for m in _comma_list(args.modes)]
    config = offload_config(args)
    from .cli_generate import generation_params

    params = generation_params(args, demo_defaults(args))  # a bad command line fails before the model loads
    pipeline = load(args, config)
    if params.width is not None and params.height is not None:
        check_sizes(pipeline, [(params.width, params.height)], "--size")
    disable_progress_bar(pipeline)
    results = [_bench_mode(pipeline, params, config.replace(mode=mode), args.repeats) for mode in modes]
    if args.diffusers:
        results += _bench_diffusers(pipeline, params, config.device, args.repeats)
    records = [record for record, _ in results]
    out_dir = Path(args.out_dir)
    command = "vramferry " + " ".join(sys.argv[1:]) if sys.argv[1:] else "vramferry bench"
    meta = {
        "command": command,
        "model": args.model or "demo",
        "config": config.to_dict(),
        "params": vars(params),
    }
    title = f"vramferry bench: {type(pipeline).__name__}"
    paths = [
        write_json(out_dir / "bench.json", records, meta),
        write_markdown(out_dir / "bench.md", records, title=title, command=command),
        plot_memory(out_dir / "memory.png", {r.label: t for r, t in results}, title=title),
    ]
    print(format_table(records, detailed=True))
    print("wrote " + ", ".join(str(p) for p in paths))
    return EXIT_OK if all(r.error is None for r in records) else EXIT_FAILURE


# -- the parser and main -------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress"
    )
    return common


def _add_generation_options(parser: argparse.ArgumentParser, *, seed: int | None) -> None:
    parser.add_argument("--prompt", help="what to generate (default with the demo: its prompt)")
    parser.add_argument("--negative-prompt", help="what to steer away from")
    parser.add_argument("--steps", type=_positive_int, help="denoising steps")
    parser.add_argument(
        "--size", type=parse_size, metavar="WxH", help="width x height in pixels, e.g. 1024x1024"
    )
    parser.add_argument("--seed", type=int, default=seed, help=f"random seed (default: {seed})")
    parser.add_argument("--guidance", type=float, help="guidance scale")
    parser.add_argument("--frames", type=_positive_int, help="frames, for video pipelines")


def _add_plan(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "plan",
        parents=[common],
        help="show discovery and the placement plan (no GPU needed)",
        description="Without a budget, GPU or mode: what discovery finds. With --vram-budget, --gpu, "
        "--bandwidth/--tflops or --offload: also the plan, its predicted peak memory and time.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        metavar="PATH_OR_ID",
        help="diffusers pipeline folder or Hub id (default: the built-in demo)",
    )
    source.add_argument(
        "--arch", metavar="NAME", help="a full-size architecture on the meta device; 'list' lists them"
    )
    p.add_argument("--dtype", help="weights' dtype: float32, float16 or bfloat16")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.add_argument("--gpu", help="a known GPU for the cost model (e.g. h100)")
    p.add_argument("--bandwidth", metavar="RATE", help="host-to-device bandwidth, e.g. 55GB/s")
    p.add_argument("--tflops", type=float, help="dense bf16 TFLOP/s of the GPU")
    p.add_argument("--gpu-memory", metavar="SIZE", help="the GPU's memory, e.g. 80GiB")
    p.add_argument("--height", type=_positive_int, help="image height in pixels")
    p.add_argument("--width", type=_positive_int, help="image width in pixels")
    p.add_argument("--frames", type=_positive_int, help="video frames")
    p.add_argument("--steps", type=_positive_int, help="denoising steps per request")
    p.add_argument(
        "--batch", type=_positive_int, help="images per DiT call (the plan sizes activations for it)"
    )
    p.add_argument(
        "--throughput",
        type=_positive_int,
        nargs="?",
        const=8,
        metavar="MAX",
        help="also predict step time, images per second and peak for batches 1 to MAX (default 8)",
    )
    add_offload_options(p)
    p.set_defaults(handler=cmd_plan)


def _add_generate(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "generate",
        parents=[common],
        help="prompt to image (or video) file, with the memory/time table",
        description="Generate one image, or one video, and print mode, peak memory, time and bytes moved.",
    )
    _add_model_options(p)
    _add_generation_options(p, seed=0)
    p.add_argument(
        "--out",
        metavar="FILE",
        help="output file (default vramferry.png, or vramferry.mp4 for a video pipeline). Images: any format "
        "Pillow writes, by suffix. Videos: .mp4 (H.264), .webm (VP9) or .gif; any other suffix writes one PNG "
        "per frame, FILE_0000.png, FILE_0001.png, ...",
    )
    p.add_argument("--fps", type=_positive_int, default=16, help="a video's frames per second (default: 16)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_offload_options(p)
    p.set_defaults(handler=cmd_generate)


def _add_bench(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bench",
        parents=[common],
        help="the memory/time table across modes (needs a CUDA GPU)",
        description="Run the same request under each mode in one process; write bench.json, bench.md "
        "and memory.png (allocated GPU memory over time per mode) to --out-dir.",
    )
    _add_model_options(p)
    _add_generation_options(p, seed=0)
    p.add_argument("--modes", default="none,model,layerwise,auto", help="comma-separated offload modes")
    p.add_argument("--diffusers", action="store_true", help="add diffusers' model and group offload rows")
    p.add_argument("--repeats", type=_positive_int, default=2, help="steady runs per mode (median reported)")
    p.add_argument("--out-dir", default="vramferry-bench", help="where the JSON, Markdown and plot go")
    add_offload_options(p)
    p.set_defaults(handler=cmd_bench)


def _add_serve(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="OpenAI-style image generation server",
        description="Serve POST /v1/images/generations, GET /v1/models, /v1/plans, /health and /metrics.",
    )
    _add_model_options(p)
    p.add_argument("--served-model-name", help="the id in /v1/models (default: --model, or vramferry-demo)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    p.add_argument("--port", type=_port, default=8091, help="port (default: 8091)")
    p.add_argument(
        "--allowed-hosts",
        type=_comma_list,
        metavar="HOST[,HOST]",
        help="the Host header values answered, e.g. localhost,images.example.com; '*.example.com' matches "
        "subdomains, '*' any host (default: loopback names on a loopback address, any on a network address)",
    )
    p.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (default: $VRAMFERRY_API_KEY, if set)"
    )
    p.add_argument(
        "--max-queue", type=_positive_int, default=8, help="waiting requests before 429 (default: 8)"
    )
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per request before 504 (default: 300)"
    )
    p.add_argument("--max-size", type=_positive_int, default=2048, help="largest image side (default: 2048)")
    p.add_argument(
        "--sizes",
        type=_size_list,
        metavar="WxH[,WxH]",
        help="request sizes to plan at start in auto mode, listed on GET /v1/plans (others plan on first use)",
    )
    p.add_argument(
        "--lora",
        type=_lora_spec,
        action="append",
        metavar="NAME=PATH",
        help="load a LoRA adapter (a local folder or .safetensors file) at start; repeatable. Requests choose "
        "weights with 'lora' (default: every adapter at 1.0)",
    )
    p.add_argument(
        "--spool-dir",
        metavar="DIR",
        help="where finished videos are kept (default: a temporary folder, removed when the server stops)",
    )
    p.add_argument(
        "--video-retention",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="how long a finished video job and its file are kept (default: 3600)",
    )
    add_batch_options(p)
    add_offload_options(p)
    add_replica_options(p)
    p.set_defaults(handler=cmd_serve)


def _size_list(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(parse_size(part) for part in _comma_list(text))


def build_parser() -> argparse.ArgumentParser:
    """The ``vramferry`` parser with its five commands."""
    from . import __version__

    parser = _Parser(prog="vramferry", description="Run diffusion pipelines larger than the GPU.")
    parser.add_argument("--version", action="version", version=f"vramferry {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    common = _common()
    for add in (_add_plan, _add_generate, _add_bench, _add_serve, add_compress):
        add(sub, common)
    return parser


def _configure_logging(verbose: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    root = logging.getLogger("vramferry")
    root.setLevel(level)
    if not any(getattr(h, "_vramferry", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._vramferry = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose, args.debug)
    use_expandable_segments()
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        return _report(exc)


def use_expandable_segments() -> bool:
    """Have the CUDA caching allocator grow segments in place, unless the user configured it already.

    Weights swapped in and out, and activations of changing shapes, fragment a plain caching allocator: with
    expandable segments far less memory sits reserved but unused, and the planner (which detects the
    setting) keeps more weights resident within a budget. The CLI owns its process, so it sets this before CUDA
    starts; library users set ``PYTORCH_CUDA_ALLOC_CONF`` themselves. Returns whether it was set here.
    """
    if any(os.environ.get(name) for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        return False
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return False  # too late: the allocator read its settings when CUDA started
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return True


def _report(exc: Exception) -> int:
    """One line on stderr for an error; the exit code."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"error: out of device memory ({first}); try a smaller --vram-budget or --offload layerwise",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if isinstance(exc, (OffloadError, ValueError, UsageError)):
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, ImportError):
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
    return EXIT_FAILURE
