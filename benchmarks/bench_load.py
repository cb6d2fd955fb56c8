"""Cold start: a saved pipeline folder straight into the host store, against reading its files raw.

    # GPU machine (as root, so that the page cache can be dropped before each cold figure):
    python benchmarks/bench_load.py --drop-caches --folder /tmp/flux1-sized --out benchmarks/results/load_gpu.json
    # CPU only (peak RSS of load + apply; a FLUX.1-wide transformer with fewer blocks):
    python benchmarks/bench_load.py --cpu --folder /tmp/flux-cpu --out benchmarks/results/load_cpu.json

The folder is written first when it does not exist (random bf16 weights; on the GPU the full FLUX.1-dev layout,
about 33 GB, on the CPU ``--blocks`` transformer blocks at FLUX.1's width with tiny encoders). Every section runs
in a fresh process, so its peak RSS is its own and a section that fails loses no other section's figures
(``--out`` is rewritten after each one).

Sections:
  raw_read        the files read start to end (one thread, 16 MiB reads; and 8 threads, 64 MiB reads): disk speed
  reader          the library's file reader alone into fresh arenas, at 1, 4 and 16 threads (``--reader-threads``;
                  page cache dropped)
  load            ``vramferry.load`` (page cache dropped), then one request on the GPU: times, peak RSS
  load_libs_warm  the same with only the folder's files dropped from the page cache (libraries warm)
  load_no_warm_up the same without the kernel warm-up beside the fill (``warm_up=False``)
  load_cuda_cold  the same in a process that has not started CUDA (as the CLI's ``--model``)
  load_small_pages  the same with the host store's arenas on 4 KiB pages (not transparent huge pages)
  load_no_prefetch  the same without asking the kernel to read the files ahead while the modules are built
  load_warm       the same with the files already in the page cache
  load_profiled   ``load`` with both requests under PyTorch's profiler (CPU side): the operators whose first calls
                  cost most (each kernel's code loaded on first launch shows as its operator's time)
  load_drained    the same with the fill drained at each arena's end (the reads of the next arena start only once
                  the last ones landed and the next arena is set up), as before the fills ran back to back
  baseline        ``from_pretrained`` + ``apply`` as before: every tensor copied through its mapping, one thread
  resident        (GPU) the whole pipeline resident on the GPU: one request, warmed up: the request to add to the
                  raw read time
  resident_cold   (GPU) the same, its first request with the page cache dropped as for ``load`` (libraries
                  imported first): the first request to compare ``load``'s with
  apply_in_ram    the pipeline already in memory (not file-backed): ``apply`` packing, threaded vs one thread
  build           each component built as ``load`` builds it (page cache dropped, no prefetch): seconds each, and
                  the GB of its files it touched
  compress        ``vramferry compress`` of the transformer (lossless: every block; the compressed cache beside it)
  load_compressing  ``vramferry.load`` in layerwise mode with compression, the cache off: compressed at apply
  load_cached     the same reading the compressed cache: no raw bytes read, nothing compressed at apply
  shared          two processes load the same folder with ``host_memory_limit`` below the weights (every piece
                  mapped in the files) and hold it: each one's private and file-backed RSS, and how far the
                  machine's available memory fell (one copy of the weights in the page cache, shared)
  shared_store    the same with ``share_host_store``: the host store in shared memory, filled by one process and
                  mapped by the other (``--spread``: each process on a GPU of its own)

    # the compressed cache on the GPU (nvCOMP), cold figures:
    python benchmarks/bench_load.py --drop-caches --folder /tmp/flux1-sized \
        --sections compress,load_compressing,load_cached --out benchmarks/results/load_cached_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from load_timing import copy_sweep, import_classes, profiled, timed_request

GB = 1e9
HERE = Path(__file__).resolve().parent


DROP = False  # --drop-caches


def _drop_caches() -> bool:
    """Drop the page cache (with --drop-caches, as root); returns whether it was dropped."""
    if not DROP or os.geteuid() != 0:
        return False
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def _weights(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def _rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GB
    return 0.0


# -- writing the folder ------------------------------------------------------------------------------------------


def write_folder(folder: Path, cpu: bool, blocks: int) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from fullsize import FLUX_DEV, flux_pipeline, materialise

    if not cpu:
        pipe = flux_pipeline("cuda")
    else:
        from diffusers import FluxPipeline, FluxTransformer2DModel

        from vramferry.pipelines import build_demo_pipeline

        pipe = build_demo_pipeline()
        single = max(1, blocks // 3)
        config = {**FLUX_DEV, "num_layers": blocks - single, "num_single_layers": single}
        transformer = materialise(lambda: FluxTransformer2DModel(**config), "cpu")
        pipe = FluxPipeline(**{**pipe.components, "transformer": transformer.to(torch.bfloat16)})
        pipe.to(torch.bfloat16)
    pipe.save_pretrained(folder)


# -- sections (each in its own process) --------------------------------------------------------------------------


def section_raw_read(folder: Path, args) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    files = _weights(folder)
    total = sum(f.stat().st_size for f in files)
    found: dict = {"bytes": total, "cold": _drop_caches()}
    start = time.perf_counter()
    buffer = bytearray(16 * 2**20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    found["one_thread_s"] = time.perf_counter() - start
    found["cold_parallel"] = _drop_caches()

    def read(job: tuple[Path, int]) -> int:
        path, offset = job
        with open(path, "rb", buffering=0) as f:
            return len(os.pread(f.fileno(), 64 * 2**20, offset))

    jobs = [(p, off) for p in files for off in range(0, p.stat().st_size, 64 * 2**20)]
    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(read, jobs)) == total
    found["eight_threads_s"] = time.perf_counter() - start
    found["raw_s"] = min(found["one_thread_s"], found["eight_threads_s"])
    found["raw_gbps"] = total / found["raw_s"] / GB
    return found


def section_reader(folder: Path, args) -> dict:
    """The library's file reader alone: every file into fresh 1 GiB arenas (as the host store's), page cache
    dropped before each thread count; the gap to ``raw_read`` is the reader's and the arenas' first touch."""
    from concurrent.futures import ThreadPoolExecutor

    from vramferry.runtime.arenas import ARENA_BYTES, host_buffer
    from vramferry.runtime.files import FileReader, Region

    files = _weights(folder)
    found: dict = {"bytes": sum(f.stat().st_size for f in files)}
    for threads in args.reader_threads:
        found[f"cold_{threads}"] = _drop_caches()
        reader = FileReader()
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            arenas, jobs = [], []
            for path in files:
                size = path.stat().st_size
                for offset in range(0, size, ARENA_BYTES):
                    nbytes = min(ARENA_BYTES, size - offset)
                    arenas.append(host_buffer(nbytes))
                    jobs += reader.start([(Region(str(path), offset, nbytes), arenas[-1])], pool)
            assert sum(job.result() for job in jobs) == found["bytes"]
        found[f"threads_{threads}_s"] = time.perf_counter() - start
        reader.close()
        del arenas, jobs
    return found


def _config(args):
    import vramferry

    if args.cpu:
        return vramferry.OffloadConfig(mode=args.mode, onload_device="cpu", pin_memory=False)
    return vramferry.OffloadConfig(mode=args.mode)


def _load(
    folder: Path, args, cold: bool, drop=None, cuda_started: bool = True, profile: bool = False, **changes
) -> dict:
    """``vramferry.load`` and two requests: the libraries warm (:func:`import_classes`; CUDA started too unless
    ``cuda_started`` is off), the weights cold (the page cache dropped, or ``drop()``); ``profile``: each request
    under the profiler (:func:`profiled`; its times are then not comparable)."""
    import vramferry

    imports = import_classes(folder, gpu=cuda_started)
    found: dict = {"cold": (drop or _drop_caches)() if cold else False, "rss_after_imports_gb": _rss_gb()}
    found["imports_s"] = round(imports, 3)
    found["log"] = _capture_log()
    start = time.perf_counter()
    handle = vramferry.load(folder, _config(args).replace(**changes), dtype="bfloat16", progress=args.progress)
    found["load_s"] = time.perf_counter() - start
    found["rss_after_load_gb"] = _rss_gb()
    for name in ("first", "second"):
        phases: dict = {}
        with profiled(found, f"{name}_request_profile") if profile else contextlib.nullcontext():
            found[f"{name}_request_s"] = timed_request(handle.pipeline, args, phases)
        found[f"{name}_request_phases"] = phases
        if name == "first":
            found["load_to_first_request_end_s"] = time.perf_counter() - start
    stats = handle.stats()
    found["loaded_while_filling_gb"] = stats.loaded_while_filling_bytes / GB
    found["host_file_bytes"] = stats.host_file_bytes
    found["host_bytes"] = stats.host_pinned_bytes + stats.host_pageable_bytes
    found["fill_s"] = stats.host_fill_seconds
    found["compressed_from_cache"] = stats.compressed_from_cache
    found["compressed_at_apply"] = stats.compressed_at_apply
    found["host_compressed_bytes"] = stats.host_compressed_bytes
    found["apply_seconds"] = stats.apply_seconds
    found["peak_rss_gb"] = _peak_rss_gb()
    return found


def _capture_log() -> list[str]:
    """vramferry's INFO lines from now on (where load and apply say what took the time), kept in a list."""
    import logging

    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("vramferry")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return lines


def section_load(folder: Path, args) -> dict:
    return _load(folder, args, cold=True)


def _evict_folder(folder: Path) -> bool:
    """Drop ``folder``'s files (and only them) from the page cache; returns whether it could."""
    if not DROP or not hasattr(os, "posix_fadvise"):
        return False
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def section_load_libs_warm(folder: Path, args) -> dict:
    """``load`` with only the pipeline folder's files dropped from the page cache: the libraries stay as warm as
    for the resident request (what a serving process that loads another model sees)."""
    return _load(folder, args, cold=True, drop=lambda: _evict_folder(folder))


def section_load_no_warm_up(folder: Path, args) -> dict:
    """``load`` without the kernel warm-up beside the fill: the first request loads CUDA's kernels as it goes."""
    return _load(folder, args, cold=True, warm_up=False)


def section_load_cuda_cold(folder: Path, args) -> dict:
    """``load`` in a process that has not started CUDA yet (as ``vramferry generate --model`` does): the context is
    created, and the link measured, while the modules are built."""
    return _load(folder, args, cold=True, cuda_started=False)


def section_load_small_pages(folder: Path, args) -> dict:
    from vramferry.runtime import arenas

    arenas.HUGE_PAGES = False
    return _load(folder, args, cold=True)


def section_load_no_prefetch(folder: Path, args) -> dict:
    from vramferry.runtime import files

    files.prefetch = lambda paths: None
    return _load(folder, args, cold=True)


def section_load_profiled(folder: Path, args) -> dict:
    return _load(folder, args, cold=True, profile=True)


def section_load_drained(folder: Path, args) -> dict:
    from vramferry.runtime.fill import Filler

    fill = Filler.fill

    def drained(self, pieces, then=None):
        fill(self, pieces)
        if then is not None:
            then()

    Filler.fill = drained
    return _load(folder, args, cold=True)


def section_load_warm(folder: Path, args) -> dict:
    for path in _weights(folder):  # into the page cache
        with open(path, "rb", buffering=0) as f:
            while f.read(64 * 2**20):
                pass
    return _load(folder, args, cold=False)


def _as_before() -> None:
    """The packing before the host store read files: every tensor copied through its mapping, one thread."""
    from vramferry.runtime import fill
    from vramferry.runtime.files import FileMap

    fill.FileMap.current = classmethod(lambda cls: FileMap([]))
    fill.PARALLEL_BYTES = float("inf")


def section_baseline(folder: Path, args) -> dict:
    import diffusers
    import torch

    import vramferry

    _as_before()
    found: dict = {"cold": _drop_caches(), "rss_after_imports_gb": _rss_gb()}
    start = time.perf_counter()
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    found["from_pretrained_s"] = time.perf_counter() - start
    handle = vramferry.apply(pipe, _config(args))
    found["apply_s"] = time.perf_counter() - start - found["from_pretrained_s"]
    found["first_request_s"] = timed_request(pipe, args)
    found["load_to_first_request_end_s"] = time.perf_counter() - start
    found["host_bytes"] = handle.stats().host_pageable_bytes + handle.stats().host_pinned_bytes
    found["peak_rss_gb"] = _peak_rss_gb()
    return found


def section_resident(folder: Path, args) -> dict:
    import diffusers
    import torch

    if args.cpu:
        return {"skipped": "needs a GPU"}
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    found: dict = {"first_request_phases": {}, "request_phases": {}, "steps": args.steps, "size": args.size}
    found["first_request_s"] = timed_request(pipe, args, found["first_request_phases"])  # kernels, allocator
    found["request_s"] = timed_request(pipe, args)  # unhooked: no synchronisation per step
    timed_request(pipe, args, found["request_phases"])
    return found


def section_resident_cold(folder: Path, args) -> dict:
    """The resident pipeline's first request with the page cache dropped as for ``load`` (libraries imported and
    warmed by :func:`import_classes` first, the weights on the GPU): the kernels it loads on first use are read
    from disk as they are for ``load``'s first request."""
    import diffusers
    import torch

    if args.cpu:
        return {"skipped": "needs a GPU"}
    import_classes(folder)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    found: dict = {"cold": _drop_caches(), "first_request_phases": {}, "request_phases": {}}
    found["first_request_s"] = timed_request(pipe, args, found["first_request_phases"])
    found["request_s"] = timed_request(pipe, args, found["request_phases"])
    return found


def section_apply_in_ram(folder: Path, args) -> dict:
    import diffusers
    import torch

    import vramferry

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    with torch.no_grad():  # into anonymous memory: a pipeline built or converted in memory
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for p in component.parameters():
                    p.data = p.data.clone()
    found: dict = {"copies": copy_sweep()}
    for label in ("threaded", "one_thread", "threaded_again"):
        if label == "one_thread":
            from vramferry.runtime import fill

            saved = fill.PARALLEL_BYTES
            fill.PARALLEL_BYTES = float("inf")
        start = time.perf_counter()
        handle = vramferry.apply(pipe, _config(args))
        found[f"{label}_apply_s"] = time.perf_counter() - start
        found[f"{label}_fill_s"] = handle.stats().host_fill_seconds
        found[f"{label}_apply_seconds"] = handle.stats().apply_seconds
        found["host_bytes"] = handle.stats().host_pageable_bytes + handle.stats().host_pinned_bytes
        handle.remove()
        if label == "one_thread":
            fill.PARALLEL_BYTES = saved
    found["peak_rss_gb"] = _peak_rss_gb()
    return found


def _file_rss_gb(folder: Path) -> float:
    """GB of ``folder``'s file pages mapped into this process (pages something touched)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            inside = str(folder) in line
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total / GB


def section_build(folder: Path, args) -> dict:
    """Each component built as ``load`` builds it (untouched views of its files), one at a time, page cache
    dropped and no prefetch: seconds per component, and how much of its files it touched."""
    import cProfile
    import importlib
    import io
    import pstats

    import torch

    from vramferry.runtime.files import untouched_safetensors

    index = json.loads((folder / "model_index.json").read_text())
    found: dict = {"imports_s": round(import_classes(folder), 3), "cold": _drop_caches()}
    kept = []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        library, cls_name = entry
        cls = getattr(importlib.import_module(library), cls_name)
        kwargs = {"torch_dtype": torch.bfloat16} if issubclass(cls, torch.nn.Module) else {}
        profile = cProfile.Profile()
        start = time.perf_counter()
        with untouched_safetensors():
            profile.enable()
            kept.append(cls.from_pretrained(folder / name, **kwargs))
            profile.disable()
        found[f"{name}_s"] = round(time.perf_counter() - start, 3)
        if found[f"{name}_s"] > 1.0:  # where a slow one spent its time
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(12)
            found[f"{name}_profile"] = [line for line in text.getvalue().splitlines() if line.strip()][-13:]
        found[f"{name}_file_rss_gb"] = round(_file_rss_gb(folder / name), 3)
    found["peak_rss_gb"] = _peak_rss_gb()
    return found


def section_compress(folder: Path, args) -> dict:
    import vramferry

    start = time.perf_counter()
    config = _config(args).replace(compression="lossless")
    report = vramferry.compress(folder, config, components=["transformer"], progress=args.progress)
    found = {"seconds": time.perf_counter() - start, "written": report.written, "kept": report.kept}
    found.update(raw_bytes=report.raw_bytes, compressed_bytes=report.compressed_bytes, codec=report.codec)
    found["compress_s"] = report.seconds
    found["gbps"] = report.raw_bytes / report.seconds / GB if report.seconds > 0 else None
    return found


def section_load_compressing(folder: Path, args) -> dict:
    return _load(folder, args, True, mode="layerwise", compression="lossless", compression_cache="off")


def section_load_cached(folder: Path, args) -> dict:
    return _load(folder, args, True, mode="layerwise", compression="lossless")


def _memory_gb(fields: tuple[str, ...], path: str = "/proc/self/status") -> dict:
    found = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            found[key] = int(value.split()[0]) * 1024 / GB
    return found


def hold(folder: Path, args) -> None:
    """One of the ``shared`` sections' processes: load with every piece left mapped (``--hold mapped``) or the
    host store in shared memory (``--hold shared_store``), run a request, report its memory, and hold the handle
    until stdin closes."""
    import vramferry

    if args.hold == "shared_store":
        changes: dict = {"share_host_store": True}
    else:
        changes = {"host_memory_limit": "1MiB"}
    start = time.perf_counter()
    handle = vramferry.load(folder, _config(args).replace(**changes), dtype="bfloat16")
    load_s = time.perf_counter() - start
    if args.cpu:  # one transformer call on a few tokens (the CPU folder's encoders do not fit it): every block read
        start = time.perf_counter()
        _transformer_call(handle.pipeline.transformer)
        request_s = time.perf_counter() - start
    else:
        request_s = timed_request(handle.pipeline, args)
    stats = handle.stats()
    found = {
        "load_s": load_s,
        "request_s": request_s,
        "host_mapped_gb": stats.host_mapped_bytes / GB,
        "host_shared_gb": stats.host_shared_bytes / GB,
        "host_shared_found_gb": stats.host_shared_found_bytes / GB,
        "host_file_gb": stats.host_file_bytes / GB,
        "host_store_gb": (stats.host_pinned_bytes + stats.host_pageable_bytes) / GB,
        **_memory_gb(("VmRSS", "RssAnon", "RssFile", "RssShmem")),
    }
    print("RESULT " + json.dumps(found), flush=True)
    sys.stdin.readline()  # the parent reads this process's share once both have loaded
    print("RESULT " + json.dumps(_rollup_gb()), flush=True)
    sys.stdin.read()


def _rollup_gb() -> dict:
    """This process's proportional set size (``Pss``: each shared page counted once across the processes that map
    it, split between them), private and file-backed."""
    found = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        if key in ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Shared_Clean"):
            found[key] = int(value.split()[0]) * 1024 / GB
    return found


def _transformer_call(transformer) -> None:
    import torch

    cfg = transformer.config
    dtype = torch.bfloat16
    with torch.no_grad():
        transformer(
            hidden_states=torch.randn(1, 16, cfg.in_channels, dtype=dtype),
            encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, dtype=dtype),
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, dtype=dtype),
            timestep=torch.ones(1, dtype=dtype),
            img_ids=torch.zeros(16, 3, dtype=dtype),
            txt_ids=torch.zeros(8, 3, dtype=dtype),
            guidance=torch.ones(1, dtype=dtype) if cfg.guidance_embeds else None,
        )


def section_shared(folder: Path, args, how: str = "mapped") -> dict:
    """Two processes serving the same folder (``host_memory_limit`` below the weights, so every piece stays mapped
    in the files): each one's RSS, private (``RssAnon``) and file-backed, and its proportional share (``Pss``)
    while both hold the weights: the file-backed shares sum to one copy of the weights (the page cache's)."""
    _drop_caches()
    child = [sys.executable, __file__, "--hold", how, *sys.argv[1:]]
    # --spread: one GPU each (process i sees GPU i alone), as one process per GPU serves one model.
    envs = [{**os.environ, "CUDA_VISIBLE_DEVICES": str(i)} if args.spread else None for i in range(2)]
    procs = [
        subprocess.Popen(child, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for env in envs
    ]
    found: dict = {"processes": []}

    def result(proc) -> dict:
        for line in proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :])
        raise RuntimeError("a holding process ended without its result")

    try:
        found["processes"] = [result(proc) for proc in procs]
        for proc in procs:  # both hold the weights now: their shares of the pages
            proc.stdin.write("\n")
            proc.stdin.flush()
        for entry, proc in zip(found["processes"], procs, strict=True):
            entry.update(result(proc))
        found["pss_total_gb"] = sum(p["Pss"] for p in found["processes"])
        found["pss_file_total_gb"] = sum(p["Pss_File"] for p in found["processes"])
        found["pss_shmem_total_gb"] = sum(p.get("Pss_Shmem", 0.0) for p in found["processes"])
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait()
    return found


def section_shared_store(folder: Path, args) -> dict:
    """The same two processes with ``share_host_store``: the host store in shared memory, filled by one process
    and mapped by the other (page-locked in each on a GPU); the shared-memory shares sum to one copy."""
    return section_shared(folder, args, how="shared_store")


SECTIONS = {
    "raw_read": section_raw_read,
    "reader": section_reader,
    "load": section_load,
    "load_libs_warm": section_load_libs_warm,
    "load_no_warm_up": section_load_no_warm_up,
    "load_cuda_cold": section_load_cuda_cold,
    "load_small_pages": section_load_small_pages,
    "load_no_prefetch": section_load_no_prefetch,
    "load_drained": section_load_drained,
    "load_profiled": section_load_profiled,
    "load_warm": section_load_warm,
    "baseline": section_baseline,
    "resident": section_resident,
    "resident_cold": section_resident_cold,
    "apply_in_ram": section_apply_in_ram,
    "build": section_build,
    "compress": section_compress,
    "load_compressing": section_load_compressing,
    "load_cached": section_load_cached,
    "shared": section_shared,
    "shared_store": section_shared_store,
}


# -- driver ------------------------------------------------------------------------------------------------------


def _summarise(results: dict, weights: int) -> dict:
    """Peak RSS against the limits, and each loading section's time from ``load`` to the end of its first request
    over (the files' fastest raw read, ``raw_read``'s or the reader's, + the resident pipeline's request)."""
    summary: dict = {"weights_gb": weights / GB}
    load = results.get("load", {})
    if "peak_rss_gb" in load:
        summary["load_peak_rss_over_weights"] = load["peak_rss_gb"] / (weights / GB)
        summary["load_peak_rss_limit_cpu_gb"] = 1.1 * weights / GB + 0.5
        summary["load_peak_rss_limit_gpu_gb"] = 1.05 * weights / GB + 2
    reads = [results.get("raw_read", {}).get("raw_s")]
    reads += [v for k, v in results.get("reader", {}).items() if k.startswith("threads_")]
    reads = [r for r in reads if r is not None]
    if not reads:
        return summary
    summary["raw_s"] = raw = min(reads)
    resident = results.get("resident", {})
    requests = {
        "": resident.get("request_s"),
        "_first": resident.get("first_request_s"),  # the resident pipeline's first: kernels loaded, allocator
        "_cold_first": results.get("resident_cold", {}).get("first_request_s"),  # libraries read from disk too
    }
    for name, found in results.items():
        end = found.get("load_to_first_request_end_s") if isinstance(found, dict) else None
        if end is None or name.endswith("profiled"):
            continue
        for suffix, request in requests.items():
            if request is not None:
                summary[f"{name}_to_first_request_over_raw_plus{suffix}_resident"] = end / (raw + request)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folder", required=True, type=Path, help="pipeline folder (written when missing)")
    parser.add_argument("--cpu", action="store_true", help="no GPU: offload to the CPU, no requests")
    parser.add_argument("--blocks", type=int, default=6, help="--cpu: transformer blocks at FLUX.1's width")
    parser.add_argument("--sections", default="raw_read,load,load_warm,baseline,resident,apply_in_ram", help=f"of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--mode", default=None, help="offload mode (default: auto on the GPU, layerwise on the CPU)"
    )
    parser.add_argument(
        "--reader-threads", type=lambda text: [int(n) for n in text.split(",")], default=[1, 4, 16],
        help="reader: the thread counts to time, comma-separated",
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--progress", action="store_true", help="show the loading bar")
    parser.add_argument(
        "--drop-caches", action="store_true", help="drop the page cache before each cold figure (needs root)"
    )
    parser.add_argument(
        "--spread", action="store_true", help="shared sections: each process on its own GPU (GPU 0 and GPU 1)"
    )
    parser.add_argument("--out", type=Path, default=Path("load.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--hold", choices=["mapped", "shared_store"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.mode = args.mode or ("layerwise" if args.cpu else "auto")
    global DROP
    DROP = args.drop_caches
    if args.hold:
        hold(args.folder, args)
        return
    if args.child:
        found = SECTIONS[args.child](args.folder, args)
        print("RESULT " + json.dumps(found), flush=True)
        return
    if not (args.folder / "model_index.json").exists():
        start = time.perf_counter()
        write_folder(args.folder, args.cpu, args.blocks)
        print(f"wrote {args.folder} in {time.perf_counter() - start:.1f} s", flush=True)
    weights = sum(f.stat().st_size for f in _weights(args.folder))
    results: dict = {"command": " ".join(sys.argv), "weights_bytes": weights}
    for name in args.sections.split(","):
        child = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
        done = subprocess.run(child, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode == 0 and lines:
            results[name] = json.loads(lines[-1][len("RESULT ") :])
        else:
            results[name] = {"error": done.returncode, "stderr_tail": done.stderr[-3000:]}
        print(name, json.dumps(results[name], indent=1), flush=True)
        results["summary"] = _summarise(results, weights)
        args.out.write_text(json.dumps(results, indent=1))
    print("summary", json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
