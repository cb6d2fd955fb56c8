"""Several GPUs' PCIe links for one pipeline: the FLUX.1-sized transformer streamed layerwise with helper GPUs.

    # two GPUs (cuda:0 runs the model, cuda:1 lends its link):
    python benchmarks/bench_links.py --out benchmarks/results/links.json
    # one GPU: the same path with the execution device as its own helper (one link, the helper code running)
    python benchmarks/bench_links.py --helpers cuda:0 --out links_one_gpu.json

Sections:
  bandwidth       each GPU's pinned host->device rate alone, each helper's peer rate to the execution device,
                  and the rates of the links together: every GPU copying from the host at once, and the helper
                  path at once (host -> helper -> peer copy -> device beside the device's own copies): the
                  aggregate bandwidth the step is held against
  flux_layerwise  the 12B transformer at 1024^2 (4096 tokens): resident, layerwise on the device's link alone,
                  layerwise with the helpers; step times against the single-link floor and the aggregate floor
                  (streamed bytes / each bandwidth), the bytes each link carried, and whether each output is bitwise
                  the resident one

The host store of N processes serving one model (one per GPU) is measured by ``bench_load.py --sections shared_store
--spread``. Random bf16 weights at real sizes (no downloads).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import vramferry
from vramferry.api import apply

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_offload  # noqa: E402
from bench_offload import GB, RESULTS, _Holder, _step_times, free_all, log  # noqa: E402
from fullsize import flux_inputs, flux_transformer  # noqa: E402

TOKENS = 4096  # 1024^2


def _synchronise(devices) -> None:
    for device in devices:
        torch.cuda.synchronize(device)


def _concurrent_seconds(jobs, devices, reps: int = 3) -> float:
    """Best seconds of ``reps`` rounds, each issuing every job (a callable issuing copies on its own stream) and
    waiting for all of them."""
    best = float("inf")
    for _ in range(reps + 1):  # the first round warms up
        _synchronise(devices)
        start = time.perf_counter()
        for job in jobs:
            job()
        _synchronise(devices)
        best = min(best, time.perf_counter() - start)
    return best


def bandwidth(device: torch.device, helpers: list[torch.device], nbytes: int = 1 << 30) -> float:
    """The aggregate host->device rate of the execution device's link and its helpers' (bytes per second)."""
    from vramferry.runtime.probe import measure_h2d_bandwidth, measure_peer_bandwidth

    s = "bandwidth"
    others = [h for h in helpers if h != device]
    for gpu in [device, *others]:
        log(s, f"h2d_{gpu}_GBps", round(measure_h2d_bandwidth(gpu, nbytes) / GB, 2))
    for helper in others:
        log(
            s,
            f"peer_{helper}_to_{device}_GBps",
            round(measure_peer_bandwidth(helper, device, nbytes) / GB, 2),
        )
    links = [device, *others]
    hosts = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1) for _ in links]
    targets = {gpu: torch.empty(nbytes, dtype=torch.uint8, device=gpu) for gpu in links}
    landing = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in others]
    streams = {gpu: torch.cuda.Stream(gpu) for gpu in links}

    def h2d(gpu, host):
        def job():
            with torch.cuda.stream(streams[gpu]):
                targets[gpu].copy_(host, non_blocking=True)

        return job

    def helper_path(gpu, host, land):
        def job():
            with torch.cuda.stream(streams[gpu]):
                targets[gpu].copy_(host, non_blocking=True)
                land.copy_(targets[gpu], non_blocking=True)  # peer to peer, on the helper's stream

        return job

    both = _concurrent_seconds([h2d(g, h) for g, h in zip(links, hosts, strict=True)], links)
    log(s, "h2d_all_links_at_once_GBps", round(nbytes * len(links) / both / GB, 2))
    path = [h2d(device, hosts[0])] + [
        helper_path(g, h, land) for g, h, land in zip(others, hosts[1:], landing, strict=True)
    ]
    seconds = _concurrent_seconds(path, links)
    aggregate = nbytes * len(links) / seconds
    log(s, "helper_path_at_once_GBps", round(aggregate / GB, 2))
    for held in (hosts, targets, landing):  # free the buffers before the model is built
        held.clear()
    free_all()
    return aggregate if others else measure_h2d_bandwidth(device, nbytes)


def flux_layerwise(device: torch.device, helpers: list[torch.device], aggregate: float) -> None:
    s = "flux_layerwise"
    torch.manual_seed(0)
    model = flux_transformer(str(device))
    inputs = flux_inputs(TOKENS, str(device))
    with torch.inference_mode():
        expected = model(**inputs)[0].cpu()
    log(s, "resident_step_s", round(_step_times(model, inputs), 4))
    single = RESULTS["bandwidth"][f"h2d_{device}_GBps"] * GB
    for tag, names in (("one_link", ()), ("helpers", tuple(str(h) for h in helpers))):
        handle = apply(_Holder(model), vramferry.OffloadConfig(mode="layerwise", helper_devices=names))
        streamed = sum(u.nbytes for u in handle.units() if u.kind == "block")
        if tag == "one_link":
            log(s, "streamed_GB_per_step", round(streamed / GB, 3))
            log(s, "single_link_floor_s", round(streamed / single, 4))
            log(s, "aggregate_floor_s", round(streamed / aggregate, 4))
        with torch.inference_mode():
            got = model(**inputs)[0].cpu()
        log(s, f"{tag}_bitwise_equal_to_resident", bool(torch.equal(got, expected)))
        handle.reset_stats()
        step = _step_times(model, inputs)
        log(s, f"{tag}_step_s", round(step, 4))
        log(s, f"{tag}_over_single_link_floor", round(step / (streamed / single), 3))
        log(s, f"{tag}_over_aggregate_floor", round(step / (streamed / aggregate), 3))
        stats = handle.stats()
        log(s, f"{tag}_link_GB", [round(b / GB, 2) for b in stats.link_bytes])
        log(s, f"{tag}_sync_loads", stats.sync_loads)
        handle.remove()
        free_all()
    log(s, "helpers_over_one_link", round(RESULTS[s]["helpers_step_s"] / RESULTS[s]["one_link_step_s"], 3))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda:0", help="the execution device")
    parser.add_argument(
        "--helpers", default=None, help="helper GPUs, comma-separated (default: every other GPU)"
    )
    parser.add_argument("--sections", default="bandwidth,flux_layerwise")
    parser.add_argument("--out", type=Path, default=Path("links.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_links.py needs CUDA GPUs")
    bench_offload.OUT_PATH = args.out  # log() rewrites it after every figure
    device = torch.device(args.device)
    names = (
        args.helpers.split(",")
        if args.helpers
        else [f"cuda:{i}" for i in range(torch.cuda.device_count()) if i != device.index]
    )
    if not names:
        sys.exit(
            "no helper GPU: this machine has one GPU; pass --helpers cuda:0 to run the helper path over one link"
        )
    helpers = [torch.device(name) for name in names]
    log("setup", "gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    log("setup", "helpers", names)
    sections = args.sections.split(",")
    aggregate = bandwidth(device, helpers) if "bandwidth" in sections or "flux_layerwise" in sections else 0.0
    if "flux_layerwise" in sections:
        flux_layerwise(device, helpers, aggregate)


if __name__ == "__main__":
    main()
