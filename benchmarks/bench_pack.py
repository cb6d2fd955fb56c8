"""Where ``apply`` spends its time on a pipeline already in host memory (FLUX.1-dev-sized, random bf16 weights):

    python benchmarks/bench_pack.py --out pack.json [--modes layerwise,auto]

For each mode: the whole ``apply``, the part spent filling the host store (``stats().host_fill_seconds``), and
the functions that took longest under cProfile (allocating and registering the arenas, discovery, planning,
hooks). Also the two primitives it rests on, timed alone on 4 GiB: allocating a pageable buffer and page-locking
it in place (``cudaHostRegister``), and a threaded copy into it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import bench_offload as bench
import torch

import vramferry
from vramferry.api import apply

GB = bench.GB


def primitives(s: str) -> None:
    from vramferry.runtime.arenas import host_buffer
    from vramferry.runtime.fill import default_threads

    n = 4 << 30
    t0 = time.perf_counter()
    buf = host_buffer(n)
    bench.log(s, "alloc_4GiB_s", round(time.perf_counter() - t0, 3))
    t0 = time.perf_counter()
    buf.fill_(0)
    bench.log(s, "first_touch_4GiB_s", round(time.perf_counter() - t0, 3))
    t0 = time.perf_counter()
    err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), n, 0)
    bench.log(s, "register_4GiB_s", round(time.perf_counter() - t0, 3))
    source = torch.ones(n, dtype=torch.uint8)
    from concurrent.futures import ThreadPoolExecutor

    threads = default_threads()
    parts = [(buf[i : i + n // threads], source[i : i + n // threads]) for i in range(0, n, n // threads)]
    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda p: p[0].copy_(p[1]), parts))
        bench.log(s, f"copy_4GiB_{threads}threads_GBps", round(n / (time.perf_counter() - t0) / GB, 2))
    if err == 0:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


def applied(s: str, pipe, mode: str) -> None:
    config = {"layerwise": dict(mode="layerwise"), "auto": dict(mode="auto", vram_budget="16GB")}[mode]
    config = vramferry.OffloadConfig(compression="off", **config)
    bench.free_all()
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    handle = apply(pipe, config)
    profiler.disable()
    took = time.perf_counter() - t0
    stats = handle.stats()
    bench.log(s, f"{mode}_apply_s", round(took, 2))
    bench.log(s, f"{mode}_host_fill_s", round(stats.host_fill_seconds, 2))
    bench.log(s, f"{mode}_host_pinned_GB", round(stats.host_pinned_bytes / GB, 2))
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
    bench.log(s, f"{mode}_profile", text.getvalue().splitlines()[-40:])
    handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="pack.json")
    parser.add_argument("--modes", default="layerwise,auto")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    from fullsize import flux_pipeline

    bench.OUT_PATH = Path(args.out)
    bench.RESULTS.update(device=torch.cuda.get_device_name(), torch=torch.__version__)
    bench.RESULTS["command"] = f"python benchmarks/bench_pack.py --modes {args.modes}"
    s = "pack"
    bench._try(s, "primitives", lambda: primitives(s))
    pipe = flux_pipeline()
    pipe.to("cpu")
    weights = sum(
        p.numel() * p.element_size()
        for c in pipe.components.values()
        if isinstance(c, torch.nn.Module)
        for p in c.parameters()
    )
    bench.log(s, "weights_GB", round(weights / GB, 2))
    for mode in args.modes.split(","):
        bench._try(s, mode, lambda m=mode: applied(s, pipe, m))
    Path(args.out).write_text(json.dumps(bench.RESULTS, indent=1))


if __name__ == "__main__":
    main()
