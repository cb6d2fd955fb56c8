"""Compiled blocks under offload, and what the hooks cost, at real size (FLUX.1-dev-sized transformer, random bf16
weights, 1024^2 = 4096 image tokens), all in one run:

    python benchmarks/bench_compile.py --out benchmarks/results/compile.json [--budget 16]
        [--parts hooks,layerwise,auto] [--compression auto,off,lossless]

- hooks: the eager resident step, bare and under a handle that keeps every block resident (auto, ample budget):
  the difference is what the offload hooks cost per step.
- compiled: diffusers' regional compilation (``compile_repeated_blocks(fullgraph=True)``, inductor), resident;
  then the same compiled model streamed layerwise and planned by auto under the budget: step time, dynamo's graph
  and recompile counts before and after the offloaded steps, output against the compiled resident run, and auto's
  prediction (first on the cost model's estimates, then re-planned with the block times it measured) against the
  measured step, once per ``--compression`` value; for each auto plan, where the step's time goes (the host's
  issue time, the copy engine's busy time, the compute stream's waits, the bytes decoded).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import bench_offload as bench
import torch

import vramferry
from vramferry.api import apply
from vramferry.errors import CodecUnavailable
from vramferry.planning import Workload
from vramferry.runtime.codecs import import_nvcomp

GB = bench.GB


def _output(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs)[0].float().cpu()


def _dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "recompiles": int(sum(counters["recompiles"].values())),
    }


def _issue_and_stalls(s: str, tag: str, handle, model, inputs, steps: int = 4) -> None:
    """Where a step's time goes: how long the host takes to issue ``steps`` chained forwards (a host-bound step
    issues as slowly as it runs), and per step the copy engine's busy time and the compute stream's waits."""
    with torch.inference_mode():
        model(**inputs)
        torch.cuda.synchronize()
        handle.reset_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            model(**inputs)
        issued = time.perf_counter() - t0
        torch.cuda.synchronize()
        ran = time.perf_counter() - t0
    stats = handle.stats()
    bench.log(s, f"{tag}_host_issue_per_step_s", round(issued / steps, 4))
    bench.log(s, f"{tag}_gpu_per_step_s", round(ran / steps, 4))
    bench.log(s, f"{tag}_copy_engine_per_step_s", round(stats.copy_seconds / steps, 4))
    bench.log(s, f"{tag}_compute_waits_per_step_s", round(stats.wait_seconds / steps, 4))
    bench.log(s, f"{tag}_decoded_GB_per_step", round(stats.bytes_decoded / steps / GB, 3))


def hooks(s: str, model, inputs) -> None:
    """Per-step cost of the hooks alone: every block resident, so nothing is copied during the step."""
    bare = bench._step_times(model, inputs, reps=7)
    bench.log(s, "eager_resident_step_s", round(bare, 4))
    handle = apply(bench._Holder(model), vramferry.OffloadConfig(mode="auto", vram_budget="120GB"))
    try:
        dit = handle.plan.get("transformer")
        bench.log(s, "hooked_plan", f"{dit.placement}, {dit.streamed_blocks}/{len(dit.blocks)} streamed")
        hooked = bench._step_times(model, inputs, reps=7)
        bench.log(s, "hooked_resident_step_s", round(hooked, 4))
        bench.log(s, "hook_cost_fraction_of_step", round((hooked - bare) / bare, 4))
    finally:
        handle.remove()


def compiled(s: str, model, inputs, budget: float, compression: str, parts: list[str]) -> None:
    t0 = time.perf_counter()
    model.compile_repeated_blocks(fullgraph=True)
    reference = _output(model, inputs)  # compiles
    bench.log(s, "compile_s", round(time.perf_counter() - t0, 1))
    bench.log(s, "compiled_resident_step_s", round(bench._step_times(model, inputs), 4))
    bench.log(
        s, "resident_step_s", bench.RESULTS[s]["compiled_resident_step_s"]
    )  # what offloaded runs compare to
    bench.peaks(s, "compiled_resident")

    def offloaded(tag: str, config: vramferry.OffloadConfig, workload: Workload | None) -> None:
        bench.free_all()
        handle = apply(bench._Holder(model), config, workload=workload)
        try:
            streamed = sum(u.nbytes for u in handle.units() if u.kind == "block")
            bench.log(s, f"{tag}_streamed_GB", round(streamed / GB, 3))
            dit = handle.plan.get("transformer")
            bench.log(s, f"{tag}_plan", f"{dit.streamed_blocks}/{len(dit.blocks)} streamed, {dit.codec}")
            before = _dynamo_counts()
            bench.free_all()
            step = bench._step_times(model, inputs)
            after = _dynamo_counts()
            bench.log(s, f"{tag}_step_s", round(step, 4))
            bench.log(
                s,
                f"{tag}_over_compiled_resident",
                round(step / bench.RESULTS[s]["compiled_resident_step_s"], 3),
            )
            bench.log(s, f"{tag}_predicted_step_s", round(handle.plan.predicted_step_s or 0, 4))
            bench.log(
                s, f"{tag}_predicted_over_measured", round((handle.plan.predicted_step_s or 0) / step, 3)
            )
            bench.log(s, f"{tag}_new_graphs", after["unique_graphs"] - before["unique_graphs"])
            bench.log(s, f"{tag}_new_graph_breaks", after["graph_breaks"] - before["graph_breaks"])
            bench.log(s, f"{tag}_new_recompiles", after["recompiles"] - before["recompiles"])
            bench.peaks(s, tag)
            out = _output(model, inputs)
            bench.log(s, f"{tag}_bitwise_equal_compiled_resident", bool(torch.equal(out, reference)))
            bench.log(s, f"{tag}_max_abs_diff", float((out - reference).abs().max()))
            if config.mode == "auto":
                bench.log(s, f"{tag}_within_budget", torch.cuda.max_memory_reserved() <= budget * GB)
                _issue_and_stalls(s, tag, handle, model, inputs)
                bench.calibrate_and_remeasure(
                    s, tag, handle, lambda: bench._step_times(model, inputs), budget
                )
                _issue_and_stalls(s, f"{tag}_calibrated", handle, model, inputs)
        finally:
            handle.remove()

    if "layerwise" in parts:
        bench._try(
            s, "layerwise", lambda: offloaded("layerwise", vramferry.OffloadConfig(mode="layerwise"), None)
        )
    if "auto" not in parts:
        return
    work = Workload(height=1024, width=1024, steps=28)
    for codec in compression.split(","):
        auto = vramferry.OffloadConfig(mode="auto", vram_budget=f"{budget:g}GB", compression=codec)
        tag = f"auto_{budget:g}GB" + ("" if codec == "auto" else f"_{codec}")
        bench._try(s, tag, lambda tag=tag, auto=auto: offloaded(tag, auto, work))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="compile.json")
    parser.add_argument("--budget", type=float, default=16.0, help="auto's VRAM budget in GB")
    parser.add_argument(
        "--compression",
        default="auto",
        help="auto's compression; comma-separated runs each (auto, off, lossless)",
    )
    parser.add_argument(
        "--parts", default="hooks,layerwise,auto", help="which of hooks, layerwise, auto to run"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    from fullsize import flux_inputs, flux_transformer

    bench.OUT_PATH = Path(args.out)
    bench.RESULTS.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
    bench.RESULTS["command"] = (
        f"python benchmarks/bench_compile.py --budget {args.budget:g} --compression {args.compression}"
        f" --parts {args.parts}"
    )
    s = "compile"
    try:
        import_nvcomp()
        bench.log(s, "compression", "nvCOMP installed: compression='auto' chooses per unit")
    except CodecUnavailable:
        bench.log(s, "compression", "nvCOMP absent: raw transfers")
    model = flux_transformer()
    inputs = flux_inputs(4096)
    parts = args.parts.split(",")
    if "hooks" in parts:
        bench._try(s, "hooks", lambda: hooks(s, model, inputs))
    bench._try(s, "compiled", lambda: compiled(s, model, inputs, args.budget, args.compression, parts))
    Path(args.out).write_text(__import__("json").dumps(bench.RESULTS, indent=1))


if __name__ == "__main__":
    main()
