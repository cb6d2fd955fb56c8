"""Where a model-mode request spends its time: per component, resident against ``mode="model"``.

    python benchmarks/phases_model.py --out phases.json

FLUX.1-dev-sized pipeline (random bf16 weights), 1024^2, 28 steps, latents returned. Each variant is timed twice:
the plain request (no synchronisation added), then with a device synchronisation before and after each
component's call so each component's share can be read (those syncs cost a little overlap, so the breakdown's
sum exceeds the plain request). Variants: resident, model mode with the default request order, model mode with
``order=`` naming the phases the requests run (no decode), and model mode with the VAE decode included. The
slowest host functions of one model-mode request are printed from ``cProfile``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
from bench_offload import timed  # run from benchmarks/, as the benchmark itself

import vramferry

GB = 1e9


def median_time(fn, reps: int) -> float:
    return statistics.median(timed(fn, reps))


class Breakdown:
    """Synchronised wall time per component call (outermost calls only)."""

    def __init__(self, pipe) -> None:
        self.seconds: dict[str, float] = {}
        self.handles = []
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                self.handles.append(module.register_forward_pre_hook(self._pre(name)))
                self.handles.append(module.register_forward_hook(self._post(name)))
        self.started: dict[str, float] = {}

    def _pre(self, name):
        def hook(module, args):
            torch.cuda.synchronize()
            self.started[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(module, args, output):
            torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self.started.pop(name)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def measure(pipe, run, tag: str, results: dict, handle=None) -> None:
    with torch.inference_mode():
        run()
        if handle is not None:
            handle.reset_stats()
        plain = median_time(run, 3)
        entry = {"request_s": round(plain, 3)}
        if handle is not None:
            st = handle.stats()
            entry.update(
                bytes_per_request_GB=round(st.bytes_h2d / 3 / GB, 2),
                wait_s_per_request=round(st.wait_seconds / 3, 3),
                copy_GBps=st.h2d_gbps,
                unplanned_phases=st.unplanned_phases,
            )
        bd = Breakdown(pipe)
        median_time(run, 1)
        bd.remove()
        entry["synced_component_s"] = {k: round(v, 3) for k, v in bd.seconds.items()}
    results[tag] = entry
    print(tag, json.dumps(entry), flush=True)


def profile_once(run, tag: str, results: dict) -> None:
    prof = cProfile.Profile()
    with torch.inference_mode():
        torch.cuda.synchronize()
        prof.enable()
        run()
        torch.cuda.synchronize()
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    results[tag + "_profile"] = buf.getvalue()
    print(buf.getvalue(), flush=True)


def main() -> None:
    from fullsize import flux_pipeline

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="phases.json")
    args = parser.parse_args()
    results: dict = {}
    pipe = flux_pipeline()
    call = dict(
        prompt="a photo of a cat", height=1024, width=1024, num_inference_steps=28, guidance_scale=3.5
    )
    latents = lambda: pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0))  # noqa: E731
    decoded = lambda: pipe(**call, output_type="pt", generator=torch.Generator().manual_seed(0))  # noqa: E731
    measure(pipe, latents, "resident_latents", results)
    measure(pipe, decoded, "resident_decoded", results)
    variants = [
        ("model_default_order_latents", {}, latents),
        (
            "model_order_without_decode_latents",
            {"order": ("text_encoder", "text_encoder_2", "transformer")},
            latents,
        ),
        ("model_default_order_decoded", {}, decoded),
    ]
    for tag, changes, run in variants:
        handle = vramferry.apply(pipe, vramferry.OffloadConfig(mode="model", **changes))
        measure(pipe, run, tag, results, handle)
        if tag == "model_default_order_latents":
            profile_once(run, tag, results)
        handle.remove()
        pipe.to("cuda")
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(results, indent=1))
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
