"""The timed steps ``bench_load.py``'s sections share: one request broken into phases, the libraries imported
and warmed, the profiler around a request, and the host's memory-copy rates."""

from __future__ import annotations

import contextlib
import json
import resource
import time
from pathlib import Path

GB = 1e9
PROMPT = "a photo of a cat"


def timed_request(pipe, args, phases: dict | None = None) -> float:
    """One request (seconds, GPU work included); ``phases``: filled with where it went (prompt encoding up to
    the first transformer call, each denoising step, decoding after the last), the GPU synchronised at each
    boundary, and the major page faults it took (pages read from disk: cold libraries or files)."""
    import torch

    if args.cpu:
        return 0.0
    torch.cuda.synchronize()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    start = time.perf_counter()
    marks: list[float] = []
    hooks = []
    kwargs: dict = {}
    if phases is not None:

        def first_call(module, args_, kwargs_):
            if not marks:
                torch.cuda.synchronize()
                marks.append(time.perf_counter())

        hooks.append(pipe.transformer.register_forward_pre_hook(first_call, with_kwargs=True))

        def step_end(pipe_, step, timestep, callback_kwargs):
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
            return callback_kwargs

        kwargs["callback_on_step_end"] = step_end
    size = args.size
    try:
        pipe(
            PROMPT,
            height=size,
            width=size,
            num_inference_steps=args.steps,
            guidance_scale=3.5,
            output_type="pil",
            **kwargs,
        )
        torch.cuda.synchronize()
    finally:
        for hook in hooks:
            hook.remove()
    end = time.perf_counter()
    if phases is not None and len(marks) >= 2:
        steps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        phases.update(
            encode_s=round(marks[0] - start, 3),
            first_steps_s=[round(x, 3) for x in steps[:3]],
            median_step_s=round(sorted(steps)[len(steps) // 2], 4),
            decode_s=round(end - marks[-1], 3),
            major_faults=resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults,
        )
    return end - start


def import_classes(folder: Path, gpu: bool = True) -> float:
    """Import the libraries and classes the pipeline is built from, and on a GPU run one bf16 matmul and one
    attention (seconds): a process serving a model has its code loaded, and the page cache dropped after would
    leave the imports and the first kernels reading the libraries from disk, which the resident request they are
    compared with does not do (its libraries are warm). Mapped library pages survive the drop."""
    import importlib

    import torch

    start = time.perf_counter()
    importlib.import_module("transformers.modeling_utils")
    for name, entry in json.loads((folder / "model_index.json").read_text()).items():
        if not name.startswith("_") and isinstance(entry, list) and entry[0] is not None:
            getattr(importlib.import_module(entry[0]), entry[1])
    if gpu and torch.cuda.is_available():
        x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        q = (x @ x).view(1, 1, 256, 256)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        torch.cuda.synchronize()
        del x, q
    return time.perf_counter() - start


@contextlib.contextmanager
def profiled(found: dict, key: str, rows: int = 40):
    """Profile the CPU side of what runs within; ``found[key]``: the operators with the most time of their own."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    found[key] = [
        {"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
         "total_ms": round(e.cpu_time_total / 1e3, 2)}
        for e in events
    ]  # fmt: skip


def copy_sweep(nbytes: int = 4 << 30) -> dict:
    """GB/s of copying ``nbytes`` from memory into a fresh host arena (its pages faulted in on the way), as the
    host store's fill does: one ``copy_`` (torch's own threads), and chunks on the filler's threads by
    ``copy_`` or ``memmove``."""
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from vramferry.runtime.arenas import host_buffer
    from vramferry.runtime.fill import default_threads

    source = torch.ones(nbytes, dtype=torch.uint8)
    threads = default_threads()
    found: dict = {"threads": threads, "torch_threads": torch.get_num_threads()}

    def timed(label: str, run) -> None:
        target = host_buffer(nbytes)
        start = time.perf_counter()
        run(target)
        found[label] = round(nbytes / (time.perf_counter() - start) / GB, 2)
        del target

    def chunked(how: str, chunk: int):
        def run(target):
            jobs = [(target[i : i + chunk], source[i : i + chunk]) for i in range(0, nbytes, chunk)]
            if how == "memmove":
                work = lambda job: ctypes.memmove(job[0].data_ptr(), job[1].data_ptr(), job[0].numel())  # noqa: E731
            else:
                work = lambda job: job[0].copy_(job[1])  # noqa: E731
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(work, jobs))

        return run

    timed("one_copy_gbps", lambda target: target.copy_(source))
    for chunk in (8 << 20, 32 << 20, 128 << 20):
        timed(f"threads_copy_{chunk >> 20}MiB_gbps", chunked("copy", chunk))
        timed(f"threads_memmove_{chunk >> 20}MiB_gbps", chunked("memmove", chunk))
    return found
