"""LoRA while offloaded, at FLUX.1 size: requests that switch adapter weights, and an adapter added while live, each
bitwise equal to the resident pipeline carrying the same adapters and weights, with no re-apply.

    # H200 (peft installed): the FLUX.1-dev layout with random bf16 weights, auto at 16 GB, 1024², 4 steps
    python benchmarks/bench_lora.py --out benchmarks/results/lora_h200.json
    # CPU, the demo pipeline (seconds; checks the script):
    python benchmarks/bench_lora.py --smoke --out lora_smoke.json

One process. The pipeline is built on the device with adapter ``a`` (rank 16 on the transformer's attention
projections, random non-zero weights) and run resident through the requests below, then adapter ``b`` is added
(its weights kept) and the last request run; ``b`` is deleted, the pipeline moved to the host and offloaded once.
The same requests then run offloaded, ``b`` added back live (with the kept weights) before the last:

    1. set_adapters(["a"], [1.0])
    2. set_adapters(["a"], [0.5])
    3. disable_adapters()
    4. enable_adapters(); add adapter b; set_adapters(["a", "b"], [0.5, 1.0])

Reported per request: bitwise equality with the resident image (and the largest difference when not equal), the
seconds, and ``repacked_pieces`` from the handle's counters (0 for the weight switches; the pieces holding ``b``
for the last). The offload is applied once, before the first request.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import vramferry

HERE = Path(__file__).resolve().parent
STEPS = [
    ("a at 1.0", lambda t: t.set_adapters(["a"], [1.0])),
    ("a at 0.5", lambda t: t.set_adapters(["a"], [0.5])),
    ("adapters disabled", lambda t: t.disable_adapters()),
]


def _lora_config(peft, rank: int):
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    return peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)


def _build(args):
    if args.smoke:
        from vramferry.pipelines.demo import build_demo_pipeline

        pipe = build_demo_pipeline()
    else:
        sys.path.insert(0, str(HERE))
        from fullsize import flux_pipeline

        pipe = flux_pipeline("cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, args) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    out = pipe(
        "a photo of a cat",
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        generator=generator,
        output_type="np",
    )
    return np.asarray(out.images[0])


def _requests(pipe, args, add_b, counted=lambda: None) -> list[tuple[str, np.ndarray, float, object]]:
    """Run the requests; each with its name, image, seconds and what ``counted()`` says right after it."""
    found = []
    for name, step in [*STEPS, ("a at 0.5 and b (added live) at 1.0", None)]:
        if step is not None:
            step(pipe.transformer)
        else:
            pipe.transformer.enable_adapters()
            add_b(pipe.transformer)
            pipe.transformer.set_adapters(["a", "b"], [0.5, 1.0])
        start = time.perf_counter()
        image = _image(pipe, args)
        found.append((name, image, time.perf_counter() - start, counted()))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the demo pipeline on the CPU")
    parser.add_argument("--budget", default="16GB", help="auto mode's --vram-budget")
    parser.add_argument("--size", type=int, help="request size (default 1024; --smoke: 64)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default="bench_lora.json")
    args = parser.parse_args()
    import peft

    args.size = args.size or (64 if args.smoke else 1024)
    device = "cpu" if args.smoke else "cuda"
    report: dict = {"command": " ".join(sys.argv), "device": device, "steps": args.steps, "size": args.size}
    pipe = _build(args)
    torch.manual_seed(0)
    pipe.transformer.add_adapter(_lora_config(peft, args.rank), adapter_name="a")
    kept: dict = {}

    def add_b_resident(transformer):
        transformer.add_adapter(_lora_config(peft, args.rank), adapter_name="b")
        kept.update({k: v.detach().to("cpu", copy=True) for k, v in transformer.state_dict().items() if ".b." in k})

    resident = _requests(pipe, args, add_b_resident)
    pipe.transformer.delete_adapters("b")
    pipe.to("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()

    def add_b_live(transformer):
        transformer.add_adapter(_lora_config(peft, args.rank), adapter_name="b")
        transformer.load_state_dict(kept, strict=False)  # the same weights as the resident run's b

    config = vramferry.OffloadConfig(
        mode="auto", vram_budget=None if args.smoke else args.budget, onload_device=device
    )
    start = time.perf_counter()
    handle = vramferry.apply(pipe, config)
    report["apply_s"] = round(time.perf_counter() - start, 2)
    try:
        rows = []
        before = handle.stats().repacked_pieces
        offloaded = _requests(pipe, args, add_b_live, lambda: handle.stats().repacked_pieces)
        for (name, expected, resident_s, _), (_n, got, offload_s, repacked) in zip(resident, offloaded, strict=True):
            equal = bool(np.array_equal(got, expected))
            row = {
                "request": name,
                "bitwise_equal_resident": equal,
                "max_abs_diff": None if equal else float(np.abs(got - expected).max()),
                "resident_s": round(resident_s, 3),
                "offloaded_s": round(offload_s, 3),
                "repacked_pieces": repacked - before,
            }
            before = repacked
            rows.append(row)
            print(json.dumps(row), flush=True)
        report["requests"] = rows
        if device == "cuda":
            report["peak_reserved_GB"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
        report["all_bitwise_equal"] = all(r["bitwise_equal_resident"] for r in rows)
    finally:
        handle.remove()
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}: all bitwise equal {report['all_bitwise_equal']}")
    sys.exit(0 if report["all_bitwise_equal"] else 1)


if __name__ == "__main__":
    main()
