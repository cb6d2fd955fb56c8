"""torchao fp8 weight-only at FLUX.1 size: the transformer with random bf16 weights, quantized on the device with
``quantize_(transformer, Float8WeightOnlyConfig())``, at 1024^2 (4096 image tokens), every part in one process:

    python benchmarks/bench_fp8.py --out benchmarks/results/fp8.json [--budget 8] [--parts layerwise,auto,diffusers]
    python benchmarks/bench_fp8.py --smoke --quant int8 --out /tmp/fp8_smoke.json  # tiny, on the CPU: code paths only

Sections of the JSON: ``bandwidth`` (bench_offload's pinned, pageable and registered host->device figures; the
library's 256 MiB probe with ``--probe-bandwidth``) and ``fp8``, whose parts are:

- build: ``bf16_GB`` before quantizing, ``quantized_GB`` after (the bytes every parameter is stored in: fp8 data,
  float32 scales, the bf16 biases and norms left as they were; ``quantized_by_dtype_GB``), ``formats`` (parameters
  per tensor class),
  ``build_s`` and ``quantize_s``; the model moves to the host before ``apply`` (``to_host_s``).
- resident: the quantized transformer on the device, ``resident_step_s`` and its peaks; its output is the
  reference every other part is compared with bit for bit (``<part>_bitwise_equal_resident``, and the largest
  absolute difference when not equal).
- layerwise (``compression="off"``): ``streamed_GB_per_step`` (the streamed blocks' packed bytes, 512-byte
  aligned), ``layerwise_h2d_GB_per_step`` (``stats().bytes_h2d`` over the timed forwards) and its ratios to the
  streamed and the quantized bytes, ``floor_step_s`` (streamed bytes / the pinned bandwidth of this run),
  ``layerwise_over_floor`` against the 1.03 target, ``layerwise_over_resident``, link speed, waits, sync loads,
  peak allocated and reserved.
- auto at ``--budget`` GB (``compression="off"``, the 1024^2 28-step workload), keys ``auto_<budget>GB_*``: the
  plan, step against resident, the plan's predicted step (``stats().predicted_step_seconds``) and the mean DiT call
  the handle timed (``stats().dit_call_seconds``) against the measured step, peak reserved from ``apply`` on
  against the budget; then a re-plan with the block times it measured (bench_offload's ``calibrate_and_remeasure``).
- diffusers: ``enable_group_offload(offload_type="block_level", num_blocks_per_group=1, use_stream=True)`` on a
  fresh quantized model (same seed, so the same weights): ``diffusers_step_s`` and its ratios, or
  ``diffusers_error`` (exception type and message), ``diffusers_failed_at`` (enable, forward) and
  ``diffusers_error_where`` (the innermost frames).

Steps are the median of ``--reps`` samples of ``--chain`` back-to-back forwards (no host synchronisation between
them, as a denoising loop runs), after one warm-up sample; the handle's counters cover the timed forwards only.
Forwards run under ``torch.no_grad``, as diffusers' pipelines run them (``--inference-mode``: under
``torch.inference_mode``, which the other benchmark files use). ``--smoke`` builds a three-block transformer on the
CPU with a stand-in bandwidth (``onload_device="cpu"``, group offload without a stream): it checks the code paths,
not the figures.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import bench_offload as bench
import torch

import vramferry
from vramferry.api import apply
from vramferry.discovery.leaves import format_name, storage_bytes, tensor_bytes
from vramferry.planning import Workload

GB = bench.GB
S = "fp8"
QUANT = {"fp8": "Float8WeightOnlyConfig", "int8": "Int8WeightOnlyConfig"}
# One double-stream and two single-stream blocks, two heads of 128: seconds on two CPU cores.
SMOKE_CONFIG = dict(num_layers=1, num_single_layers=2, num_attention_heads=2)
SMOKE_BANDWIDTH = 10 * GB  # no host->device link on the CPU: a stand-in, so the floor figures are computed
DEVICE = "cuda"
REPS, CHAIN = 3, 4
# diffusers' pipelines run their transformer under no_grad. Under inference_mode, rebinding a torchao tensor's
# ``param.data`` (as vramferry's stores do at every load) raises NotImplementedError in torchao 0.18
# (``aten._has_compatible_shallow_copy_type``); ``--inference-mode`` runs the parts that way to record it.
GRAD_MODE = torch.no_grad


def _on_cuda() -> bool:
    return DEVICE == "cuda"


def _sync() -> None:
    if _on_cuda():
        torch.cuda.synchronize()


def _free() -> None:
    if _on_cuda():
        bench.free_all()
    else:
        gc.collect()


def _reset_peaks() -> None:
    if _on_cuda():
        bench.reset_peak()


def _peaks(tag: str) -> None:
    if _on_cuda():
        bench.peaks(S, tag)


def _log(key: str, value) -> None:
    bench.log(S, key, value)


def _try(part: str, fn) -> None:
    """One part; a failure is logged and the next part still runs."""
    try:
        fn()
    except Exception as exc:
        _log(f"{part}_error", f"{type(exc).__name__}: {str(exc)[:800]}")
        traceback.print_exc()
        _free()


def _steps(model, inputs, handle=None, reset_peaks: bool = True) -> tuple[float, int]:
    """Median seconds per forward, and the number of forwards timed (see the module docstring)."""

    def sample() -> None:
        for _ in range(CHAIN):
            model(**inputs)

    times = []
    with GRAD_MODE():
        sample()
        _sync()
        if handle is not None:
            handle.reset_stats()
        if reset_peaks:
            _reset_peaks()
        for _ in range(REPS):
            t0 = time.perf_counter()
            sample()
            _sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / CHAIN, REPS * CHAIN


def _output(model, inputs) -> torch.Tensor:
    with GRAD_MODE():
        return model(**inputs)[0].cpu()


def _compare(tag: str, out: torch.Tensor, reference: torch.Tensor) -> None:
    equal = bool(torch.equal(out, reference))
    _log(f"{tag}_bitwise_equal_resident", equal)
    if not equal:
        _log(f"{tag}_max_abs_diff", float((out.float() - reference.float()).abs().max()))


def build(args, tag: str = "") -> torch.nn.Module:
    """The FLUX.1-sized transformer (tiny with ``--smoke``), seeded so that every build has the same weights, then
    quantized where it was built (torchao's fp8 kernels want the device)."""
    import torchao.quantization as quantization
    from fullsize import flux_transformer
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = flux_transformer(DEVICE, **(SMOKE_CONFIG if args.smoke else {}))
    _sync()
    _log(f"{tag}build_s", round(time.perf_counter() - t0, 2))
    _log(f"{tag}bf16_GB", round(sum(tensor_bytes(p) for p in model.parameters()) / GB, 3))
    t0 = time.perf_counter()
    quantize_(model, getattr(quantization, QUANT[args.quant])())
    _sync()
    _log(f"{tag}quantize_s", round(time.perf_counter() - t0, 2))
    _free()
    return model


def describe(model) -> int:
    """Logs the quantized bytes (in all and by storage dtype) and the tensor classes; returns the bytes."""
    by_dtype: collections.Counter = collections.Counter()
    formats: collections.Counter = collections.Counter()
    for p in model.parameters():
        by_dtype.update(storage_bytes(p))
        formats[format_name(p) or str(p.dtype)] += 1
    total = sum(by_dtype.values())
    _log("quantized_GB", round(total / GB, 3))
    _log("quantized_by_dtype_GB", {k: round(v / GB, 4) for k, v in sorted(by_dtype.items())})
    _log("formats", dict(formats))
    return total


def to_host(model, tag: str = "") -> None:
    t0 = time.perf_counter()
    model.to("cpu")
    _log(f"{tag}to_host_s", round(time.perf_counter() - t0, 2))
    _free()


def resident(model, inputs) -> torch.Tensor:
    reference = _output(model, inputs)
    step, _ = _steps(model, inputs)
    _log("resident_step_s", round(step, 4))
    _peaks("resident")
    return reference


def layerwise(model, inputs, reference, bw: float, quantized: int) -> None:
    _free()
    t0 = time.perf_counter()
    config = vramferry.OffloadConfig(mode="layerwise", compression="off", onload_device=DEVICE)
    handle = apply(bench._Holder(model), config)
    try:
        _log("layerwise_apply_s", round(time.perf_counter() - t0, 2))
        entry = handle.inventory.get("transformer")
        _log("layerwise_inventory_GB", round(entry.bytes / GB, 3))
        _log("layerwise_inventory_formats", sorted(entry.formats))
        streamed = sum(u.nbytes for u in handle.units() if u.kind == "block")
        floor = streamed / bw
        _log("streamed_GB_per_step", round(streamed / GB, 3))
        _log("floor_step_s", round(floor, 4))
        _free()
        step, forwards = _steps(model, inputs, handle)
        st = handle.stats()
        per_step = st.bytes_h2d / forwards
        _log("layerwise_step_s", round(step, 4))
        _log("layerwise_h2d_GB_per_step", round(per_step / GB, 3))
        _log("layerwise_h2d_over_streamed", round(per_step / streamed, 4))
        _log("layerwise_h2d_over_quantized", round(per_step / quantized, 4))
        _log("layerwise_over_floor", round(step / floor, 3))
        _log("layerwise_within_1.03_floor", step <= 1.03 * floor)
        _log("layerwise_over_resident", round(step / bench.RESULTS[S]["resident_step_s"], 3))
        _log("layerwise_predicted_step_s", st.predicted_step_seconds)
        _log("layerwise_link_GBps", st.h2d_gbps)
        _log("layerwise_wait_s_per_step", round(st.wait_seconds / forwards, 4))
        _log("layerwise_sync_loads", st.sync_loads)
        _log("layerwise_host_pinned_GB", round(st.host_pinned_bytes / GB, 3))
        _peaks("layerwise")
        _compare("layerwise", _output(model, inputs), reference)
    finally:
        handle.remove()


def auto(model, inputs, reference, budget: float, size: int) -> None:
    tag = f"auto_{budget:g}GB"
    _free()
    _reset_peaks()  # the budget holds from apply on, not only in the timed steps
    config = vramferry.OffloadConfig(
        mode="auto", vram_budget=f"{budget:g}GB", compression="off", onload_device=DEVICE
    )
    handle = apply(bench._Holder(model), config, workload=Workload(height=size, width=size, steps=28))
    try:
        plan = handle.plan
        dit = plan.get("transformer")
        _log(
            f"{tag}_plan",
            f"{dit.placement.value}, {dit.streamed_blocks}/{len(dit.blocks)} streamed, "
            f"depth {dit.prefetch_depth}, {dit.codec}",
        )
        _log(f"{tag}_predicted_peak_GB", round((plan.predicted_peak_bytes or 0) / GB, 2))
        streamed = sum(u.nbytes for u in handle.units() if u.kind == "block")
        _log(f"{tag}_streamed_GB", round(streamed / GB, 3))
        step, forwards = _steps(model, inputs, handle, reset_peaks=False)
        st = handle.stats()
        _log(f"{tag}_step_s", round(step, 4))
        _log(f"{tag}_step_over_resident", round(step / bench.RESULTS[S]["resident_step_s"], 3))
        _log(f"{tag}_h2d_GB_per_step", round(st.bytes_h2d / forwards / GB, 3))
        _log(f"{tag}_predicted_step_s", st.predicted_step_seconds)
        if st.predicted_step_seconds:
            _log(f"{tag}_predicted_over_measured", round(st.predicted_step_seconds / step, 3))
        _log(f"{tag}_stats_dit_call_s", st.dit_call_seconds)
        _log(f"{tag}_stats_dit_calls", st.dit_calls)
        _log(f"{tag}_sync_loads", st.sync_loads)
        _peaks(tag)
        if _on_cuda():
            _log(f"{tag}_within_budget", torch.cuda.max_memory_reserved() <= budget * GB)
        _compare(tag, _output(model, inputs), reference)
        if _on_cuda():
            _try(
                f"{tag}_calibration",
                lambda: bench.calibrate_and_remeasure(
                    S, tag, handle, lambda: _steps(model, inputs, reset_peaks=False)[0], budget
                ),
            )
    finally:
        handle.remove()


def _failed(stage: str, exc: Exception) -> None:
    _log("diffusers_failed_at", stage)
    _log("diffusers_error", f"{type(exc).__name__}: {str(exc)[:800]}")
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    _log("diffusers_error_where", [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames])
    traceback.print_exc()


def diffusers_group(args, inputs, reference) -> None:
    """diffusers' group offload as its docs give it for streaming (one block per group, on a stream)."""
    _free()
    model = build(args, tag="diffusers_")
    to_host(model, tag="diffusers_")
    try:
        model.enable_group_offload(
            torch.device(DEVICE),
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=_on_cuda(),  # streams need CUDA; the CPU smoke run checks the rest
        )
    except Exception as exc:
        _failed("enable", exc)
        return
    try:
        step, _ = _steps(model, inputs)
        _log("diffusers_step_s", round(step, 4))
        _peaks("diffusers")
        r = bench.RESULTS[S]
        _log("diffusers_over_resident", round(step / r["resident_step_s"], 3))
        if "layerwise_step_s" in r:
            _log("diffusers_over_layerwise", round(step / r["layerwise_step_s"], 3))
        if "floor_step_s" in r:
            _log("diffusers_over_floor", round(step / r["floor_step_s"], 3))
        _compare("diffusers", _output(model, inputs), reference)
    except Exception as exc:
        _failed("forward", exc)


def offloaded(args, bw: float, inputs) -> torch.Tensor:
    """Resident, then vramferry's parts on the same model; returns the resident output (the model is freed on
    return)."""
    model = build(args)
    quantized = describe(model)
    reference = resident(model, inputs)
    to_host(model)
    parts = args.parts.split(",")
    if "layerwise" in parts:
        _try("layerwise", lambda: layerwise(model, inputs, reference, bw, quantized))
    if "auto" in parts:
        _try("auto", lambda: auto(model, inputs, reference, args.budget, args.size))
    return reference


def run(args, bw: float) -> None:
    from fullsize import flux_inputs

    side = args.size // 16  # 8x VAE downsampling, 2x2 patches
    _log("image_tokens", side * side)
    inputs = flux_inputs(side * side, DEVICE)
    reference = offloaded(args, bw, inputs)
    _free()
    if "diffusers" in args.parts.split(","):
        _try("diffusers", lambda: diffusers_group(args, inputs, reference))


def bandwidth(args) -> float:
    if not _on_cuda():
        bench.log("bandwidth", "smoke_stand_in_GBps", SMOKE_BANDWIDTH / GB)
        return SMOKE_BANDWIDTH
    if not args.probe_bandwidth:
        return bench.bandwidth()
    from vramferry.runtime.probe import measure_h2d_bandwidth

    bw = measure_h2d_bandwidth(torch.device("cuda"))
    bench.log("bandwidth", "probe_h2d_pinned_GBps", round(bw / GB, 2))
    return bw


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="fp8.json")
    parser.add_argument("--parts", default="layerwise,auto,diffusers", help="after resident: any of these")
    parser.add_argument("--budget", type=float, default=8.0, help="auto's VRAM budget in GB")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--quant", choices=sorted(QUANT), default="fp8", help="torchao weight-only config")
    parser.add_argument("--reps", type=int, default=3, help="timed samples per step figure")
    parser.add_argument("--chain", type=int, default=4, help="back-to-back forwards per sample")
    parser.add_argument("--probe-bandwidth", action="store_true", help="the 256 MiB probe, not the section")
    parser.add_argument(
        "--inference-mode", action="store_true", help="run forwards under inference_mode, not no_grad"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny transformer on the CPU at 128^2 (unless --size is given)"
    )
    args = parser.parse_args()
    global DEVICE, REPS, CHAIN, GRAD_MODE
    REPS, CHAIN = args.reps, args.chain
    if args.inference_mode:
        GRAD_MODE = torch.inference_mode
    if args.smoke:
        DEVICE = "cpu"
        if args.size == parser.get_default("size"):
            args.size = 128
    elif not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke)")
    elif args.quant == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("torchao's fp8 needs a CUDA device of compute capability 8.9 or newer")
    import diffusers
    import torchao

    bench.OUT_PATH = Path(args.out)
    bench.RESULTS.update(
        device=torch.cuda.get_device_name() if _on_cuda() else "cpu (smoke)",
        torch=torch.__version__,
        torchao=torchao.__version__,
        diffusers=diffusers.__version__,
        allocator=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default"),
        command=" ".join(["python benchmarks/bench_fp8.py", *sys.argv[1:]]),
    )
    t0 = time.perf_counter()
    bw = bandwidth(args)
    _log("pinned_GBps_used", round(bw / GB, 2))
    _log("grad_mode", GRAD_MODE.__name__)
    try:
        run(args, bw)
    except Exception as exc:  # keep what was measured
        _log("error", f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    _log("section_s", round(time.perf_counter() - t0, 1))
    Path(args.out).write_text(json.dumps(bench.RESULTS, indent=1))


if __name__ == "__main__":
    main()
