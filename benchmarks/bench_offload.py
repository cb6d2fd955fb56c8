"""Offload benchmarks at real sizes (random bf16 weights), every mode beside diffusers' offload in one run.

    python benchmarks/bench_offload.py --sections bandwidth,flux_model,flux_layerwise,omnigen2,wan_layerwise \
        --out benchmarks/results/h100.json

Sections:
  bandwidth       pinned and pageable host->device bandwidth (the physical floor's denominator)
  flux_model      FLUX.1-dev-sized pipeline, 28 steps at 1024^2: resident vs vramferry model offload vs diffusers'
                  enable_model_cpu_offload, per-request time, overhead and bytes moved
  flux_layerwise  the 12B transformer alone at 1024^2 and 512^2: resident vs vramferry layerwise vs diffusers group
                  offload (block_level, use_stream=True); step time against the transfer floor
  omnigen2        an OmniGen2-sized layout: no offload vs model offload (peak reserved, peak allocated, time)
  wan_layerwise   a Wan 2.1 14B-sized transformer at 480x832, 81 frames: resident vs layerwise
  auto            FLUX.1-dev-sized pipeline at 1024^2 under VRAM budgets 8..24 GB: peak reserved, step time
  compressed      the 12B transformer at 1024^2 with lossless compressed transfers (nvCOMP ANS): step vs the bf16
                  floor, uncompressed layerwise and diffusers group offload; ratio, decode GB/s, peak allocated,
                  host RSS and time to compress at apply; bitwise equality with resident
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

import vramferry
from vramferry.api import apply

GB = 1e9
RESULTS: dict = {}
OUT_PATH: Path | None = None  # rewritten after every figure, so a run cut short keeps what it measured


def log(section: str, key: str, value) -> None:
    RESULTS.setdefault(section, {})[key] = value
    print(f"{section}.{key}: {value}", flush=True)
    if OUT_PATH is not None:
        OUT_PATH.write_text(json.dumps(RESULTS, indent=1))


def host_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GB
    return 0.0


def timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def reset_peak() -> None:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def peaks(section: str, tag: str) -> None:
    log(section, f"{tag}_peak_alloc_GB", round(torch.cuda.max_memory_allocated() / GB, 2))
    log(section, f"{tag}_peak_reserved_GB", round(torch.cuda.max_memory_reserved() / GB, 2))


def free_all() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    empty_host_cache()


def empty_host_cache() -> None:
    """Give back pinned buffers cached by PyTorch's host allocator (``pin_memory``, diffusers' offloads)."""
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):
        fn = getattr(torch._C, name, None)
        if fn is not None:
            fn()
            return


# -- sections -------------------------------------------------------------------------------------------------
def bandwidth() -> float:
    """Host->device GB/s from 2 GiB buffers: pinned (cudaHostAlloc), pageable, and registered in place the way
    the host store does it (with and without transparent huge pages); then the same over 8 GiB, where page
    tables stop fitting in the IOMMU's caches."""
    from vramferry.runtime.arenas import host_buffer

    def registered(n: int, huge: bool) -> torch.Tensor:
        buf = host_buffer(n) if huge else torch.empty(n, dtype=torch.uint8)
        buf.fill_(1)
        torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), n, 0)
        return buf

    for n, tag in ((2 << 30, ""), (8 << 30, "_8GiB")):
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        sources = [("pinned", torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1))]
        if not tag:
            sources.append(("pageable", torch.empty(n, dtype=torch.uint8).fill_(1)))
        sources += [("registered", registered(n, False)), ("registered_hugepages", registered(n, True))]
        for name, src in sources:
            dev.copy_(src, non_blocking=True)
            t = min(timed(lambda s=src, d=dev: d.copy_(s, non_blocking=True), 3))
            log("bandwidth", f"h2d_{name}{tag}_GBps", round(n / t / GB, 2))
            if name.startswith("registered"):
                torch.cuda.cudart().cudaHostUnregister(src.data_ptr())
        sources.clear()
        free_all()
    # pin_memory buffers return to the caching host allocator, which keeps them: give them back (free_all), so
    # that the host-RSS figures of later sections count the pipeline's weights only.
    log("bandwidth", "host_rss_after_GB", round(host_rss_gb(), 2))
    return RESULTS["bandwidth"]["h2d_pinned_GBps"] * GB


def flux_model(bw: float) -> None:
    from fullsize import flux_pipeline

    s = "flux_model"
    pipe = flux_pipeline()
    weights = sum(
        p.numel() * p.element_size()
        for m in pipe.components.values()
        if isinstance(m, torch.nn.Module)
        for p in m.parameters()
    )
    log(s, "weights_GB", round(weights / GB, 2))
    call = dict(
        prompt="a photo of a cat",
        height=1024,
        width=1024,
        num_inference_steps=28,
        guidance_scale=3.5,
        output_type="latent",
    )
    run = lambda: pipe(**call, generator=torch.Generator().manual_seed(0))  # noqa: E731
    with torch.inference_mode():
        timed(run, 1)
        reset_peak()
        t_res = statistics.median(timed(run, 2))
    log(s, "resident_request_s", round(t_res, 3))
    peaks(s, "resident")
    rss0 = host_rss_gb()
    t = time.perf_counter()
    handle = apply(pipe, vramferry.OffloadConfig(mode="model"))
    log(s, "apply_s", round(time.perf_counter() - t, 2))
    log(s, "host_rss_after_apply_GB", round(host_rss_gb(), 2))
    log(s, "host_rss_before_apply_GB", round(rss0, 2))
    rss_bound = 1.05 * weights / GB + 2
    log(s, "host_rss_bound_GB", round(rss_bound, 2))  # 1.05 x weight bytes + 2 GB
    log(s, "host_rss_within_bound", host_rss_gb() <= rss_bound)
    log(s, "host_rss_growth_over_weights", round((host_rss_gb() - rss0) * GB / weights, 3))
    free_all()
    with torch.inference_mode():
        timed(run, 1)  # first request: learns nothing new (diffusers declares the order), loads everything
        handle.reset_stats()
        t_model = statistics.median(timed(run, 3))
    st = handle.stats()
    per_request = st.bytes_h2d / 3
    log(s, "model_request_s", round(t_model, 3))
    peaks(s, "model")
    log(s, "model_bytes_per_request_GB", round(per_request / GB, 2))
    log(s, "model_copy_GBps", st.h2d_gbps)
    log(s, "model_wait_s_per_request", round(st.wait_seconds / 3, 3))
    log(s, "model_d2h_bytes", st.bytes_d2h)
    overhead = t_model - t_res
    floor = per_request / bw
    log(s, "model_overhead_s", round(overhead, 3))
    log(s, "model_transfer_floor_s", round(floor, 3))
    log(s, "model_overhead_over_floor", round(overhead / floor, 3))
    log_model_prediction(s, handle, overhead)
    handle.remove()
    pipe.to("cpu")
    free_all()
    pipe.enable_model_cpu_offload()
    with torch.inference_mode():
        timed(run, 1)
        reset_peak()
        t_diff = statistics.median(timed(run, 2))
    log(s, "diffusers_model_offload_request_s", round(t_diff, 3))
    peaks(s, "diffusers_model_offload")
    log(s, "diffusers_overhead_s", round(t_diff - t_res, 3))
    log(s, "diffusers_overhead_over_ours", round((t_diff - t_res) / max(overhead, 1e-3), 1))
    pipe.remove_all_hooks()


def log_model_prediction(s: str, handle, overhead: float) -> None:
    """The planner's view of the same run: predicted peak, and predicted overhead over its resident plan."""
    from vramferry.planning.planner import plan

    config = vramferry.OffloadConfig(mode="none")
    resident = plan(handle.inventory, config, device=handle.device_profile, workload=handle.workload)
    predicted = handle.plan.predicted_request_s - resident.predicted_request_s
    log(s, "model_predicted_peak_GB", round(handle.plan.predicted_peak_bytes / GB, 2))
    log(s, "model_predicted_overhead_s", round(predicted, 3))
    log(s, "model_predicted_over_measured_overhead", round(predicted / max(overhead, 1e-3), 3))


class _Holder:
    """A pipeline-shaped holder for a lone transformer (found by the attribute scan)."""

    def __init__(self, transformer):
        self.transformer = transformer


def diffusers_group_offload(model) -> None:
    """diffusers' group offload as its docs give it for streaming: one block per group, on a stream."""
    from diffusers.hooks import apply_group_offloading

    model.to("cpu")
    free_all()
    apply_group_offloading(
        model,
        onload_device=torch.device("cuda"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=True,
    )


def _step_times(model, inputs, reps: int = 5, chain: int = 4) -> float:
    """Median seconds per forward, timing ``chain`` back-to-back forwards per sample (as a denoising loop runs:
    no host synchronisation between steps)."""

    def steps():
        for _ in range(chain):
            model(**inputs)

    with torch.inference_mode():
        timed(steps, 1)
        reset_peak()
        return statistics.median(timed(steps, reps)) / chain


def flux_layerwise(bw: float) -> None:
    from fullsize import flux_inputs, flux_transformer

    s = "flux_layerwise"
    model = flux_transformer()
    for tokens in (4096, 1024):
        log(s, f"resident_{tokens}tok_step_s", round(_step_times(model, flux_inputs(tokens)), 4))
        peaks(s, f"resident_{tokens}tok")
    holder = _Holder(model)
    handle = apply(holder, vramferry.OffloadConfig(mode="layerwise"))
    streamed = sum(u.nbytes for u in handle.units() if u.kind == "block")
    log(s, "streamed_GB_per_step", round(streamed / GB, 3))
    log(s, "floor_step_s", round(streamed / bw, 4))
    free_all()
    for tokens in (4096, 1024):
        handle.reset_stats()
        t = _step_times(model, flux_inputs(tokens))
        log(s, f"ours_{tokens}tok_step_s", round(t, 4))
        log(s, f"ours_{tokens}tok_over_floor", round(t / (streamed / bw), 3))
        peaks(s, f"ours_{tokens}tok")
        st = handle.stats()
        log(s, f"ours_{tokens}tok_copy_GBps", st.h2d_gbps)
        log(s, f"ours_{tokens}tok_sync_loads", st.sync_loads)
    handle.remove()
    diffusers_group_offload(model)
    for tokens in (4096, 1024):
        t = _step_times(model, flux_inputs(tokens))
        log(s, f"diffusers_{tokens}tok_step_s", round(t, 4))
        peaks(s, f"diffusers_{tokens}tok")
        log(s, f"diffusers_over_ours_{tokens}tok", round(t / RESULTS[s][f"ours_{tokens}tok_step_s"], 3))
    del model
    free_all()


def omnigen2(bw: float) -> None:
    from fullsize import OmniGen2Sized

    s = "omnigen2"
    pipe = OmniGen2Sized()
    with torch.inference_mode():
        timed(pipe, 1)
        reset_peak()
        t_res = statistics.median(timed(pipe, 2))
    log(s, "no_offload_request_s", round(t_res, 3))
    peaks(s, "no_offload")
    handle = apply(pipe, vramferry.OffloadConfig(mode="model"))
    free_all()
    with torch.inference_mode():
        timed(pipe, 2)  # the first request loads everything; then steady state
        reset_peak()
        handle.reset_stats()
        t_model = statistics.median(timed(pipe, 3))
    log(s, "model_request_s", round(t_model, 3))
    peaks(s, "model")
    st = handle.stats()
    log(s, "model_overhead_s", round(t_model - t_res, 3))
    log(s, "model_bytes_per_request_GB", round(st.bytes_h2d / 3 / GB, 2))
    log_model_prediction(s, handle, t_model - t_res)
    sizes = {c.name: c.bytes for c in handle.plan.components}
    log(s, "component_GB", {k: round(v / GB, 2) for k, v in sizes.items()})
    # The bound: 1.1 x (largest swap group + the activations), the activations being what the resident run
    # allocated beyond all the weights.
    activations = RESULTS[s]["no_offload_peak_alloc_GB"] - sum(sizes.values()) / GB
    bound = 1.1 * (max(sizes.values()) / GB + activations)
    log(s, "activations_GB", round(activations, 2))
    log(s, "reserved_bound_GB", round(bound, 2))
    log(s, "model_reserved_within_bound", RESULTS[s]["model_peak_reserved_GB"] <= bound)
    handle.remove()


def wan_layerwise(bw: float, frames: int) -> None:
    from fullsize import wan_inputs, wan_transformer

    s = "wan_layerwise"
    model = wan_transformer()
    inputs = wan_inputs(frames)
    log(s, "frames", frames)
    log(s, "resident_step_s", round(_step_times(model, inputs, reps=1, chain=2), 3))
    peaks(s, "resident")
    handle = apply(_Holder(model), vramferry.OffloadConfig(mode="layerwise"))
    free_all()
    t = _step_times(model, inputs, reps=1, chain=2)
    log(s, "ours_step_s", round(t, 3))
    log(s, "ours_over_resident", round(t / RESULTS[s]["resident_step_s"], 4))
    peaks(s, "ours")
    handle.remove()


AUTO_BUDGETS = (8, 12, 16, 20, 24)


def auto(bw: float) -> None:
    """FLUX.1-dev-sized pipeline under VRAM budgets: the step time comes from two request lengths (no sync)."""
    from fullsize import flux_pipeline

    s = "auto"
    pipe = flux_pipeline()
    call = dict(prompt="a photo of a cat", height=1024, width=1024, guidance_scale=3.5, output_type="latent")

    def request(steps: int):
        return lambda: pipe(**call, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))

    def step_time() -> float:
        with torch.inference_mode():
            timed(request(4), 1)
            long, short = min(timed(request(16), 2)), min(timed(request(4), 2))
        return (long - short) / 12

    log(s, "resident_step_s", round(step_time(), 4))
    pipe.to("cpu")
    for budget in AUTO_BUDGETS:
        free_all()
        torch.cuda.reset_peak_memory_stats()
        try:
            handle = apply(pipe, vramferry.OffloadConfig(mode="auto", vram_budget=f"{budget}GB"))
        except vramferry.OffloadError as exc:
            log(s, f"{budget}GB_error", str(exc))
            continue
        plan = handle.plan
        dit = plan.get("transformer")
        log(
            s,
            f"{budget}GB_plan",
            {
                c.name: (c.placement.value, f"{c.streamed_blocks}/{len(c.blocks)} streamed")
                for c in plan.components
            },
        )
        log(s, f"{budget}GB_predicted_step_s", round(plan.predicted_step_s or 0, 4))
        log(s, f"{budget}GB_predicted_peak_GB", round((plan.predicted_peak_bytes or 0) / GB, 2))
        measure_under_budget(s, f"{budget}GB", plan, step_time, budget)
        log(s, f"{budget}GB_prefetch_depth", dit.prefetch_depth)
        decode_peak(s, f"{budget}GB", pipe, call, budget)
        log(s, f"{budget}GB_block_times", [n for n in plan.notes if "block compute" in n] or "estimated")
        log(s, f"{budget}GB_estimate_only_predicted_step_s", round(_estimate_only_step(handle), 4))
        calibrate_and_remeasure(s, f"{budget}GB", handle, step_time, budget)
        handle.remove()
        pipe.to("cpu")


SHAPES = (512, 1024, 768, 1536)


def shapes(bw: float) -> None:
    """Requests cycling 512², 1024², 768², 1536² three times under auto at 16 GB (4 steps each): re-placement on
    the device, against the earlier behaviour (remove and apply again when the placement changes) in the same
    run. Each request's time includes its replan."""
    from fullsize import flux_pipeline

    from vramferry.planning import Workload
    from vramferry.planning.planner import transition_bytes

    s, steps, budget = "shapes", 4, 16
    pipe = flux_pipeline()
    config = vramferry.OffloadConfig(mode="auto", vram_budget=f"{budget}GB")

    def work(size: int) -> Workload:
        return Workload(height=size, width=size, steps=steps)

    def request(size: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(
                prompt="a photo of a cat",
                height=size,
                width=size,
                guidance_scale=3.5,
                num_inference_steps=steps,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
            )
        torch.cuda.synchronize()
        return time.perf_counter() - start

    pipe.to("cpu")
    for size in SHAPES[-1:]:  # the earlier behaviour: a new placement meant a new apply
        free_all()
        start = time.perf_counter()
        handle = apply(pipe, config, workload=work(size))
        log(s, f"baseline_{size}_apply_s", round(time.perf_counter() - start, 2))
        log(s, f"baseline_{size}_request_s", round(request(size), 3))
        handle.remove()
        pipe.to("cpu")
    free_all()
    handle = apply(pipe, config, workload=work(SHAPES[0]))
    start = time.perf_counter()
    plans = handle.prepare([work(size) for size in SHAPES])
    log(s, "prepare_s", round(time.perf_counter() - start, 3))
    for size, made in zip(SHAPES, plans, strict=True):
        blocks = made.get("transformer").blocks
        log(
            s, f"plan_{size}", f"{blocks.count(vramferry.planning.Placement.RESIDENT)}/{len(blocks)} resident"
        )
    steady = {}
    for size in SHAPES:
        # Each shape's own placement: the first requests measure its blocks, replan() then plans with the
        # measured times (as the server does once they exist), and the next request is the steady state.
        handle.replan(work(size))
        request(size)
        request(size)
        handle.replan()
        steady[size] = request(size)
        log(s, f"steady_{size}_s", round(steady[size], 3))
        log(s, f"predicted_peak_{size}_GB", round(handle.plan.predicted_peak_bytes / GB, 2))
    peak, rows, worst = 0, [], 0.0
    for _cycle in range(3):
        for size in SHAPES:
            before = handle.plan
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            replaced = handle.replan(work(size))
            took = time.perf_counter() - start
            took += request(size)
            moved = transition_bytes(before, handle.plan, handle.inventory)
            bound = steady[size] + moved / bw + 0.1
            worst = max(worst, took - bound)
            reserved = torch.cuda.max_memory_reserved()
            allocated = torch.cuda.max_memory_allocated()
            peak = max(peak, reserved)
            rows.append(
                (
                    size,
                    replaced,
                    round(took, 3),
                    round(steady[size], 3),
                    round(moved / GB, 2),
                    took <= bound,
                    round(reserved / GB, 2),
                    round(allocated / GB, 2),
                    round(handle.plan.predicted_peak_bytes / GB, 2),
                )
            )
    log(
        s,
        "cycle_columns",
        "size, re-placed, request_s, steady_s, GB changing residency, within bound, peak reserved GB, "
        "peak allocated GB, predicted peak GB",
    )
    log(s, "cycle", rows)
    log(s, "all_within_bound", all(r[5] for r in rows))
    log(s, "worst_excess_over_bound_s", round(worst, 3))
    log(s, "peak_reserved_GB", round(peak / GB, 2))
    log(s, "within_budget", peak <= budget * GB)
    handle.remove()
    pipe.to("cpu")


def decode_peak(s: str, tag: str, pipe, call: dict, budget: float) -> None:
    """The step timings return latents; one whole request (VAE decode included) checks the decode phase."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        pipe(
            **{**call, "output_type": "pt"}, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
        )
    torch.cuda.synchronize()
    peaks(s, f"{tag}_with_decode")
    log(s, f"{tag}_with_decode_within_budget", torch.cuda.max_memory_reserved() <= budget * GB)


def _estimate_only_step(handle) -> float:
    """The step the cost model alone (no measured block times) predicts for the placement ``handle`` runs."""
    from vramferry.planning.costmodel import Choice, PipelineCost, allocatable_bytes

    plan, profile, inventory = handle.plan, handle.device_profile, handle.inventory
    work = dataclasses.replace(handle.workload, block_compute_s={})
    budget = allocatable_bytes(plan.budget_bytes, profile.expandable_segments) if plan.budget_bytes else None
    cost = PipelineCost(inventory.components, inventory.order, profile, work, budget)
    choices = {}
    for c in plan.components:
        size = inventory.get(c.name)
        blocks = c.blocks or (c.placement,) * len(size.block_bytes)
        choices[c.name] = Choice(c.placement, blocks, c.prefetch_depth)
    return cost.evaluate(choices).step_s


def calibrate_and_remeasure(s: str, tag: str, handle, step_time, budget: float) -> None:
    """Re-plan with the block times measured during the requests just run; measure again if it re-placed."""
    times = handle.block_times().get("transformer")
    if times is None:
        log(s, f"{tag}_calibration", "no block times measured")
        return
    log(s, f"{tag}_measured_block_ms", round(1e3 * sum(times.seconds) / len(times.seconds), 3))
    replaced = handle.replan()
    plan = handle.plan
    log(s, f"{tag}_calibrated_replaced", replaced)
    log(s, f"{tag}_calibrated_predicted_step_s", round(plan.predicted_step_s or 0, 4))
    if not replaced:
        log(
            s,
            f"{tag}_calibrated_predicted_over_measured",
            round((plan.predicted_step_s or 0) / RESULTS[s][f"{tag}_step_s"], 3),
        )
        return
    dit = plan.get("transformer")
    log(
        s,
        f"{tag}_calibrated_plan",
        f"{dit.streamed_blocks}/{len(dit.blocks)} streamed, depth {dit.prefetch_depth}, {dit.codec}"
        f" (ratio {dit.codec_ratio:.3f})",
    )
    free_all()
    torch.cuda.reset_peak_memory_stats()
    measure_under_budget(s, f"{tag}_calibrated", plan, step_time, budget)


def measure_under_budget(s: str, tag: str, plan, step_time, budget: float) -> None:
    """Step time against the resident step and the plan's prediction; peaks against the budget."""
    t = step_time()
    log(s, f"{tag}_step_s", round(t, 4))
    log(s, f"{tag}_step_over_resident", round(t / RESULTS[s]["resident_step_s"], 3))
    log(s, f"{tag}_predicted_over_measured", round((plan.predicted_step_s or 0) / t, 3))
    peaks(s, tag)
    log(s, f"{tag}_within_budget", torch.cuda.max_memory_reserved() <= budget * GB)


def _try(section: str, part: str, fn) -> None:
    """Run one part of a section; a failure is logged and the next part still runs."""
    try:
        fn()
    except Exception as exc:
        log(section, f"{part}_error", f"{type(exc).__name__}: {exc}")
        import traceback

        traceback.print_exc()
        free_all()


def _decode_gbps(s: str) -> None:
    """nvCOMP ANS decode speed on one FLUX-block-sized buffer of N(0, 0.02) bf16 weights, bytes of output (the
    library's own probe, at 160 MiB), and one round trip checked exact."""
    from vramferry.runtime.codecs import NvcompAns
    from vramferry.runtime.probe import measure_decode_speed

    device = torch.device("cuda")
    codec = NvcompAns(device)
    log(s, "decode_GBps_out", round(measure_decode_speed(codec, device, 160 << 20) / GB, 1))
    raw = (torch.randn(160 << 20, device="cuda") * 0.02).to(torch.bfloat16).view(torch.uint8).cpu()
    encoded = codec.encode(raw)  # in chunks, as the host store keeps them
    out = torch.empty(raw.numel(), dtype=torch.uint8)
    encoded.decode_into(out)
    log(s, "sample_ratio", round(encoded.ratio, 4))
    log(s, "decode_exact", bool(torch.equal(out, raw)))


def compressed(bw: float) -> None:
    """FLUX.1-sized transformer at 1024^2 (4096 image tokens): compressed layerwise against the bf16 floor,
    uncompressed layerwise and diffusers' group offload, all in one run; outputs compared with resident."""
    from fullsize import flux_inputs, flux_transformer

    s = "compressed"
    _try(s, "decode", lambda: _decode_gbps(s))
    model = flux_transformer()
    inputs = flux_inputs(4096)
    with torch.inference_mode():
        reference = model(**inputs)[0].float().cpu()
    log(s, "resident_step_s", round(_step_times(model, inputs), 4))
    peaks(s, "resident")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    log(s, "weights_GB", round(weights / GB, 3))

    def layerwise(tag: str, compression: str) -> None:
        free_all()
        rss = host_rss_gb()
        t0 = time.perf_counter()
        handle = apply(_Holder(model), vramferry.OffloadConfig(mode="layerwise", compression=compression))
        log(s, f"{tag}_apply_s", round(time.perf_counter() - t0, 2))
        log(s, f"{tag}_host_rss_after_apply_GB", round(host_rss_gb(), 2))
        log(s, f"{tag}_host_rss_growth_GB", round(host_rss_gb() - rss, 2))
        streamed = sum(u.nbytes for u in handle.units() if u.kind == "block")
        log(s, "floor_step_s", round(streamed / bw, 4))
        try:
            free_all()
            t = _step_times(model, inputs)
            log(s, f"{tag}_step_s", round(t, 4))
            log(s, f"{tag}_over_floor", round(t / (streamed / bw), 3))
            log(s, f"{tag}_predicted_step_s", round(handle.plan.predicted_step_s or 0, 4))
            peaks(s, tag)
            st = handle.stats()
            log(s, f"{tag}_host_compressed_GB", round(st.host_compressed_bytes / GB, 3))
            if st.host_compressed_raw_bytes:
                log(s, f"{tag}_ratio", round(st.host_compressed_bytes / st.host_compressed_raw_bytes, 4))
            log(s, f"{tag}_link_GBps", st.h2d_gbps)
            log(s, f"{tag}_sync_loads", st.sync_loads)
            with torch.inference_mode():
                out = model(**inputs)[0].float().cpu()
            log(s, f"{tag}_bitwise_equal_resident", bool(torch.equal(out, reference)))
        finally:
            handle.remove()

    _try(s, "raw", lambda: layerwise("raw", "off"))
    _try(s, "lossless", lambda: layerwise("lossless", "lossless"))
    r = RESULTS[s]
    if "lossless_step_s" in r and "raw_step_s" in r:
        log(s, "lossless_over_raw", round(r["lossless_step_s"] / r["raw_step_s"], 3))
        log(s, "lossless_peak_alloc_over_raw", round(r["lossless_peak_alloc_GB"] / r["raw_peak_alloc_GB"], 3))
        log(s, "host_rss_target_GB", round(0.75 * weights / GB + 2, 2))

    def diffusers_group() -> None:
        diffusers_group_offload(model)
        t = _step_times(model, inputs)
        log(s, "diffusers_step_s", round(t, 4))
        if "lossless_step_s" in RESULTS[s]:
            log(s, "diffusers_over_lossless", round(t / RESULTS[s]["lossless_step_s"], 3))

    _try(s, "diffusers", diffusers_group)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", default="bandwidth,flux_layerwise,flux_model,omnigen2,wan_layerwise")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--budgets", default="8,12,16,20,24", help="auto section: VRAM budgets in GB")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("these benchmarks need a CUDA GPU")
    global AUTO_BUDGETS, OUT_PATH
    OUT_PATH = Path(args.out)
    AUTO_BUDGETS = tuple(int(b) for b in args.budgets.split(","))
    RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["torch"] = torch.__version__
    RESULTS["command"] = "python benchmarks/bench_offload.py --sections " + args.sections
    RESULTS["allocator"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default")
    if "bandwidth" in args.sections.split(","):
        bw = bandwidth()
    else:  # the library's own short probe (256 MiB pinned), enough for the floors of a partial run
        from vramferry.runtime.probe import measure_h2d_bandwidth

        bw = measure_h2d_bandwidth(torch.device("cuda"))
        log("bandwidth", "probe_h2d_pinned_GBps", round(bw / GB, 2))
    for name in args.sections.split(","):
        if name == "bandwidth":
            continue
        t = time.perf_counter()
        try:
            if name == "wan_layerwise":
                wan_layerwise(bw, args.frames)
            else:
                globals()[name](bw)
        except Exception as exc:  # keep the other sections' numbers
            log(name, "error", f"{type(exc).__name__}: {exc}")
            import traceback

            traceback.print_exc()
            free_all()
        free_all()
        log(name, "section_s", round(time.perf_counter() - t, 1))
        Path(args.out).write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
