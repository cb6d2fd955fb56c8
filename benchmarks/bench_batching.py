"""Request batching in the server: images per minute with batching against ``--max-batch 1``, on a FLUX.1-sized
pipeline (random bf16 weights, built on the GPU by ``fullsize.flux_pipeline()``) behind the real app and uvicorn.

    # H200, 8 steps instead of 28 and 8 clients x 2 requests per run, to stay within about 5 minutes (an
    # estimate from the planner's predicted request times and the apply times of docs/benchmarks.md):
    python benchmarks/bench_batching.py --out benchmarks/results/batching_h200.json
    # the same at the full 28 steps (about three times as long), one mode per call, raw streaming:
    python benchmarks/bench_batching.py --steps 28 --modes layerwise --compression off --out batching_28.json
    # CPU, the demo pipeline (seconds; checks the script, measures nothing of interest):
    python benchmarks/bench_batching.py --smoke --out batching_smoke.json

For each mode (``--modes``, default ``layerwise,auto``) under ``--budget`` (16GB) the offload is applied once, and
the server runs twice on it: batching on (``--max-batch``, default 8, the planner choosing fewer) and off
(``--max-batch 1``). Each run: a warm-up of two concurrent requests (not counted), then ``--clients`` concurrent
clients sending ``--requests`` requests each, one after another (``load_server.run_clients``: 1024², distinct
seeds), checked as ``load_server.py`` checks them (every request answered 200 once, the server's counters equal
to what the clients saw, distinct images). Reported per run: images per minute, p50/p99 latency, the mean wait
(queue and batch wait) and generation time per request from the server's metrics, the batch sizes of the calls,
the measured step time per batch size (CUDA events at the start of each transformer call, consecutive calls of
one pipeline call), and peak reserved memory against the budget. Per mode: the planner's predicted step time
and images per second per batch size (``planning/throughput.py``, the plans the worker caps its batches with)
beside the measured ones (``predicted``: at apply, from the cost model, as the worker's first batches are capped;
``predicted_after``: after the runs, with the block times the handle measured), and ``batched_vs_alone``: the warm-up's two batched images against the same requests
sent again with ``"batch": false`` (largest difference in levels of 255, and the share of values that differ).

The JSON goes to ``--out`` (rewritten after each run, so a run cut short keeps what it measured). Exit code 0
when every check holds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import re
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from load_server import check, run_clients, server_counts, summarise  # noqa: E402

import vramferry  # noqa: E402
from vramferry.planning.throughput import best_batch, throughput  # noqa: E402
from vramferry.server import ServerSettings, create_app, uvicorn_options  # noqa: E402
from vramferry.server.generation import GenerationParams, request_workload  # noqa: E402
from vramferry.units import parse_bytes  # noqa: E402

URL = "/v1/images/generations"


class CallClock:
    """Times each transformer call: a CUDA event (no host synchronisation) or, on the CPU, the host clock, at
    the start of every call; a text-encoder call starts a new pipeline call. Installed with PyTorch hooks."""

    def __init__(self, pipe, cuda: bool) -> None:
        self.cuda = cuda
        self.calls: list[tuple[int, list]] = []  # per pipeline call: (batch, marks)
        self.handles = [
            pipe.text_encoder_2.register_forward_pre_hook(self._new_call),
            pipe.transformer.register_forward_pre_hook(self._step, with_kwargs=True),
        ]

    def _new_call(self, module, args) -> None:
        self.calls.append((0, []))

    def _step(self, module, args, kwargs) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not self.calls:
            self.calls.append((0, []))
        batch, marks = self.calls[-1]
        if self.cuda:
            mark = torch.cuda.Event(enable_timing=True)
            mark.record()
        else:
            mark = time.perf_counter()
        self.calls[-1] = (batch or int(hidden.shape[0]), [*marks, mark])

    def step_seconds(self) -> dict[int, float]:
        """Per batch size, the median time from one transformer call's start to the next within a call."""
        if self.cuda:
            torch.cuda.synchronize()  # the events are read once, after the run
        found: dict[int, list[float]] = {}
        for batch, marks in self.calls:
            for a, b in zip(marks, marks[1:], strict=False):
                seconds = a.elapsed_time(b) / 1000 if self.cuda else b - a
                found.setdefault(batch, []).append(seconds)
        return {batch: round(statistics.median(times), 4) for batch, times in sorted(found.items())}

    def batches(self) -> dict[int, int]:
        """Pipeline calls by batch size."""
        counts: dict[int, int] = {}
        for batch, marks in self.calls:
            if marks:
                counts[batch] = counts.get(batch, 0) + 1
        return dict(sorted(counts.items()))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextmanager
def serving(app, settings: ServerSettings):
    """``app`` behind uvicorn on a free loopback port, in a thread; yields the base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **uvicorn_options(settings))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _pixels(response: httpx.Response) -> np.ndarray:
    response.raise_for_status()
    data = response.json()["data"][0]["b64_json"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=np.int16)


async def _probe(base: str, args: argparse.Namespace, alone: bool) -> list[np.ndarray]:
    """Two concurrent requests of fixed seeds (they share a call when batching is on), or the same alone."""
    bodies = [
        {"prompt": f"probe {seed}", "size": args.size, "num_inference_steps": args.steps, "seed": seed}
        for seed in (10**6, 10**6 + 1)
    ]
    async with httpx.AsyncClient(base_url=base, timeout=args.timeout + 30) as client:
        if alone:
            answers = [await client.post(URL, json={**body, "batch": False}) for body in bodies]
        else:
            answers = await asyncio.gather(*(client.post(URL, json=body) for body in bodies))
    return [_pixels(r) for r in answers]


def compare(batched: list[np.ndarray], alone: list[np.ndarray]) -> dict:
    diffs = [np.abs(a - b) for a, b in zip(batched, alone, strict=True)]
    return {
        "bit_equal": all(int(d.max()) == 0 for d in diffs),
        "max_abs_diff_levels": max(int(d.max()) for d in diffs),
        "differing_fraction": round(float(np.mean([(d > 0).mean() for d in diffs])), 6),
    }


def one_run(pipe, handle, args: argparse.Namespace, max_batch: int, budget: int | None) -> tuple[dict, list]:
    """The server with ``max_batch`` on ``handle``: warm-up, then the clients; the run's figures and problems."""
    width, height = (int(side) for side in args.size.split("x"))
    settings = ServerSettings(
        model_name="bench",
        max_queue=2 * args.clients,
        timeout=args.timeout,
        max_size=max(width, height),
        default_size=(width, height),
        call_defaults=args.call_defaults,
        max_batch=max_batch,
        batch_wait=args.batch_wait,
    )
    app = create_app(pipe, handle, settings)
    clock = CallClock(pipe, args.cuda)
    result: dict = {"max_batch": max_batch}
    try:
        with serving(app, settings) as base:
            probe = asyncio.run(_probe(base, args, alone=False))  # the warm-up
            clock.calls.clear()
            before = server_counts(base)
            metrics_before = httpx.get(f"{base}/metrics").text
            if args.cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            outcomes = asyncio.run(run_clients(base, args))
            wall = time.perf_counter() - start
            peak = torch.cuda.max_memory_reserved() if args.cuda else None
            steps, batches = clock.step_seconds(), clock.batches()  # before the probe adds its calls
            after = server_counts(base)
            text = httpx.get(f"{base}/metrics").text
            if max_batch > 1:
                result["batched_vs_alone"] = compare(probe, asyncio.run(_probe(base, args, alone=True)))
    finally:
        clock.remove()
    counts = {status: after.get(status, 0) - before.get(status, 0) for status in after}
    problems = check(outcomes, {k: v for k, v in counts.items() if v}, args)
    summary = summarise(outcomes, wall)

    def delta(name: str) -> float:
        return metric(text, name) - metric(metrics_before, name)

    requests = delta("vramferry_request_waiting_seconds_count") or 1
    result.update(
        images_per_minute=round(60 * summary["ok"] / wall, 2) if wall else None,
        latency_p50_s=summary["ok_latency_p50_s"],
        latency_p99_s=summary["ok_latency_p99_s"],
        wall_seconds=summary["wall_seconds"],
        ok=summary["ok"],
        mean_wait_s=round(delta("vramferry_request_waiting_seconds_sum") / requests, 4),
        mean_generation_s=round(delta("vramferry_generation_seconds_sum") / requests, 4),
        calls=int(delta("vramferry_batch_size_count")),
        mean_images_per_call=round(
            delta("vramferry_batch_size_sum") / (delta("vramferry_batch_size_count") or 1), 3
        ),
        calls_by_batch=batches,
        measured_step_s=steps,
        peak_reserved_bytes=peak,
        budget_bytes=budget,
    )
    if peak is not None and budget is not None and peak > budget:
        problems.append(
            f"max_batch {max_batch}: peak reserved {peak / 1e9:.2f} GB over the budget {budget / 1e9:.2f} GB"
        )
    result["problems"] = problems
    return result, problems


def predicted(handle, args: argparse.Namespace) -> list[dict]:
    """The planner's curve for the request shape under the handle's budget, as the worker asks for it."""
    width, height = (int(side) for side in args.size.split("x"))
    work = request_workload(GenerationParams(prompt="", width=width, height=height, steps=args.steps))
    points = throughput(lambda w: handle.prepare([w])[0], work, args.max_batch)
    return [
        {
            "batch": p.batch,
            "step_s": p.step_s,
            "request_s": p.request_s,
            "images_per_s": p.images_per_s,
            "peak_bytes": p.peak_bytes,
            "error": p.error,
            "chosen": p.batch == best_batch(points),
        }
        for p in points
    ]


def bench_mode(pipe, mode: str, args: argparse.Namespace, report: dict, write) -> list[str]:
    config = vramferry.OffloadConfig(
        mode=mode, vram_budget=args.budget, onload_device=args.device, compression=args.compression
    )
    budget = parse_bytes(args.budget) if args.budget and args.cuda else None
    start = time.perf_counter()
    handle = vramferry.apply(pipe, config)
    section: dict = {
        "apply_seconds": round(time.perf_counter() - start, 2),
        "predicted": predicted(handle, args),
    }
    report["modes"][mode] = section
    problems = []
    try:
        for name, max_batch in (("batched", args.max_batch), ("unbatched", 1)):
            result, found = one_run(pipe, handle, args, max_batch, budget)
            section[name] = result
            problems += [f"{mode} {name}: {p}" for p in found]
            print(
                f"{mode} {name}: {json.dumps({k: v for k, v in result.items() if k != 'problems'})}",
                flush=True,
            )
            write()
        section["predicted_after"] = predicted(handle, args)
    finally:
        handle.remove()
    if "batched" in section and "unbatched" in section:
        on, off = section["batched"], section["unbatched"]
        if on["images_per_minute"] and off["images_per_minute"]:
            section["speedup"] = round(on["images_per_minute"] / off["images_per_minute"], 3)
        measured = {**off["measured_step_s"], **on["measured_step_s"]}
        after = {p["batch"]: p["step_s"] for p in section["predicted_after"]}
        section["step_s_by_batch"] = {
            p["batch"]: {
                "predicted": p["step_s"],
                "predicted_after": after.get(p["batch"]),
                "measured": measured.get(p["batch"]),
            }
            for p in section["predicted"]
            if p["error"] is None
        }
        write()
    return problems


def build(args: argparse.Namespace):
    if args.smoke:
        from vramferry.pipelines.demo import build_demo_pipeline

        pipe = build_demo_pipeline()
        pipe.set_progress_bar_config(disable=True)
        return pipe
    from fullsize import flux_pipeline

    pipe = flux_pipeline("cuda")
    pipe.to("cpu")  # apply() takes the weights from the host
    torch.cuda.empty_cache()
    return pipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the demo pipeline on the CPU, small and quick")
    parser.add_argument("--modes", default="layerwise,auto", help="comma-separated offload modes")
    parser.add_argument("--budget", default="16GB", help="--vram-budget of every mode")
    parser.add_argument("--size", help="request size (default 1024x1024; --smoke: 64x64)")
    parser.add_argument(
        "--steps", type=int, help="denoising steps (default 8 to stay within ~5 min; --smoke: 2)"
    )
    parser.add_argument(
        "--compression",
        default="auto",
        choices=["auto", "off", "lossless"],
        help="the offload's compression (off: raw streaming, where a step is furthest above one image's compute)",
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--max-batch", type=int, default=8, help="the batched runs' --max-batch")
    parser.add_argument(
        "--batch-wait", type=float, default=ServerSettings.batch_wait, help="their --batch-wait"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="the server's per-request timeout")
    parser.add_argument("--out", default="bench_batching.json", help="where the JSON report goes")
    args = parser.parse_args(argv)
    args.cuda = not args.smoke
    if args.cuda and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke for the demo on the CPU)")
    args.device = "cuda" if args.cuda else "cpu"
    args.size = args.size or ("64x64" if args.smoke else "1024x1024")
    args.steps = args.steps or (2 if args.smoke else 8)
    args.text_tokens = 64 if args.smoke else 512  # the demo's short tokenizers; T5's 512 for FLUX.1
    args.call_defaults = {"max_sequence_length": args.text_tokens}
    args.retries, args.retry_scale = 0, 0.05  # load_server.run_clients: the queue has room for every client
    return args


def main(argv: list[str] | None = None) -> int:
    from vramferry.cli import use_expandable_segments

    use_expandable_segments()  # as vramferry serve runs (before CUDA starts)
    args = parse_args(argv)
    begin = time.perf_counter()
    out = Path(args.out)
    report: dict = {
        "command": "python benchmarks/bench_batching.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if args.cuda else "cpu",
        "settings": {k: v for k, v in vars(args).items() if k != "call_defaults"},
        "modes": {},
    }

    def write() -> None:
        report["wall_seconds"] = round(time.perf_counter() - begin, 1)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    pipe = build(args)
    report["build_seconds"] = round(time.perf_counter() - begin, 1)
    problems = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        problems += bench_mode(pipe, mode, args, report, write)
    report["problems"] = problems
    write()
    for mode, section in report["modes"].items():
        on, off = section.get("batched", {}), section.get("unbatched", {})
        print(
            f"{mode}: {on.get('images_per_minute')} images/min batched (p50 {on.get('latency_p50_s')} s, "
            f"{on.get('mean_images_per_call')} images per call) vs {off.get('images_per_minute')} unbatched "
            f"(p50 {off.get('latency_p50_s')} s): {section.get('speedup')}x; step by batch "
            f"{section.get('step_s_by_batch')}"
        )
    print("checks: " + ("all passed" if not problems else "FAILED\n  " + "\n  ".join(problems)))
    print(f"wrote {out} in {report['wall_seconds']} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
