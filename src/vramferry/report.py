"""The memory/time table shared by ``vramferry generate`` and ``vramferry bench``, and its writers.

A :class:`RunRecord` holds what one run measured (peak device memory, generation time, weight bytes moved).
:func:`format_table` renders records as a Markdown table (readable in a terminal too), :func:`write_json` and
:func:`write_markdown` store them, :class:`MemorySampler` records device memory over time from a background
thread and :func:`plot_memory` draws those traces. :func:`discovery_report` and :func:`format_discovery` are what
``vramferry plan`` shows of discovery.
"""

from __future__ import annotations

import json
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .units import format_bytes

NOT_ON_CUDA = "n/a (cpu)"


@dataclass
class RunRecord:
    """What one generation run measured.

    Attributes:
        label: the row's name (``"none"``, ``"layerwise"``, ``"diffusers model offload"``).
        device: the execution device (``"cuda:0"``, ``"cpu"``).
        seconds: wall time of the (steady, i.e. not the first) generation, in seconds.
        first_seconds: wall time of the first generation (weights cold), when measured.
        peak_allocated, peak_reserved: device memory peaks in bytes during the run; ``None`` off CUDA.
        bytes_h2d: weight bytes copied host→device during the run (from ``handle.stats()``), ``None`` when unknown.
        h2d_gbps: achieved host→device bandwidth in GB/s, ``None`` when unknown.
        wait_seconds: time compute waited for weights, ``None`` when unknown.
        error: why the run failed (``"out of memory"``), ``None`` when it succeeded.
        extra: anything else worth keeping in the JSON (plan predictions, settings).
    """

    label: str
    device: str = "cpu"
    seconds: float | None = None
    first_seconds: float | None = None
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    bytes_h2d: int | None = None
    h2d_gbps: float | None = None
    wait_seconds: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def apply_stats(self, stats: Any) -> None:
        """Copy transfer counters (and CUDA peaks, where the record has none) from an ``OffloadStats``."""
        data = stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)
        self.bytes_h2d = int(data.get("bytes_h2d", 0))
        self.h2d_gbps = float(data.get("h2d_gbps", 0.0))
        self.wait_seconds = float(data.get("wait_seconds", 0.0))
        if self.peak_allocated is None and data.get("peak_allocated"):
            self.peak_allocated = int(data["peak_allocated"])
        if self.peak_reserved is None and data.get("peak_reserved"):
            self.peak_reserved = int(data["peak_reserved"])


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


class PeakMemory:
    """Measures the device memory peaks of the code inside ``with PeakMemory(device) as peak:``.

    On CUDA it resets the allocator's peak counters on entry and reads them on exit; elsewhere the peaks stay
    ``None``.
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.allocated: int | None = None
        self.reserved: int | None = None

    def __enter__(self) -> PeakMemory:
        if _is_cuda(self.device) and torch.cuda.is_available():
            # Wait for queued work so that earlier allocations do not leak into this window.
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if _is_cuda(self.device) and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)  # the peaks are only final once the queued kernels have run
            self.allocated = int(torch.cuda.max_memory_allocated(self.device))
            self.reserved = int(torch.cuda.max_memory_reserved(self.device))


class MemorySampler:
    """Samples ``torch.cuda.memory_allocated`` from a background thread, every ``interval`` seconds.

    Use as a context manager; :attr:`trace` holds ``(seconds since start, bytes)`` pairs. Off CUDA it records
    nothing. Reading the allocator's counters takes no device synchronisation, so sampling does not slow the run.
    """

    def __init__(self, device: str | torch.device = "cuda", interval: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.trace: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.trace.append(
                (time.perf_counter() - self._start, int(torch.cuda.memory_allocated(self.device)))
            )
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._start = time.perf_counter()
        if _is_cuda(self.device) and torch.cuda.is_available():
            self._thread = threading.Thread(target=self._sample, name="vramferry-memory-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def measure(
    label: str, run_once: Callable[[], Any], device: str | torch.device, repeats: int = 1, stats: Any = None
) -> tuple[RunRecord, list[tuple[float, int]]]:
    """Time ``run_once``: one warm-up call (``first_seconds``), then ``repeats`` steady calls (their median is
    ``seconds``) under :class:`PeakMemory` and :class:`MemorySampler`.

    Args:
        label: the record's label.
        run_once: one generation.
        device: the execution device.
        repeats: steady calls.
        stats: ``handle.stats`` (a callable returning ``OffloadStats``), for bytes moved per steady call.

    Returns:
        The record (``error="out of memory"`` when the device ran out) and the memory trace of the steady calls.
    """
    record = RunRecord(label=label, device=str(device))
    sampler = MemorySampler(device)
    try:
        start = time.perf_counter()
        run_once()
        _synchronize(device)
        record.first_seconds = time.perf_counter() - start
        before = stats() if stats else None
        times = []
        with PeakMemory(device) as peak, sampler:
            for _ in range(repeats):
                start = time.perf_counter()
                run_once()
                _synchronize(device)  # a run is only over when the device is
                times.append(time.perf_counter() - start)
        record.seconds = statistics.median(times)
        record.peak_allocated, record.peak_reserved = peak.allocated, peak.reserved
        if stats:
            _stats_delta(record, before, stats(), repeats)
    except torch.OutOfMemoryError:
        record.error = "out of memory"
    return record, sampler.trace


def _synchronize(device: str | torch.device) -> None:
    if _is_cuda(device) and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def _stats_delta(record: RunRecord, before: Any, after: Any, runs: int) -> None:
    """Per steady run: bytes moved, bandwidth and weight wait, from two ``OffloadStats`` snapshots."""
    b, a = before.to_dict(), after.to_dict()
    moved = a["bytes_h2d"] - b["bytes_h2d"]
    copy = a["copy_seconds"] - b["copy_seconds"]
    record.bytes_h2d = moved // runs
    record.h2d_gbps = moved / copy / 1e9 if copy > 0 else 0.0
    record.wait_seconds = (a["wait_seconds"] - b["wait_seconds"]) / runs
    record.extra["stats"] = a


def _memory_cell(value: int | None) -> str:
    return NOT_ON_CUDA if value is None else format_bytes(value)


def _seconds_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _row(record: RunRecord, detailed: bool) -> list[str]:
    if record.error is not None:
        cells = [record.label, f"failed: {record.error}", "", ""]
        cells += ["", "", "", ""] if detailed else [""]
        return cells
    moved = "-" if record.bytes_h2d is None else format_bytes(record.bytes_h2d)
    cells = [
        record.label,
        _memory_cell(record.peak_reserved),
        _memory_cell(record.peak_allocated),
        _seconds_cell(record.seconds),
    ]
    if detailed:
        cells.append(_seconds_cell(record.first_seconds))
        cells.append(moved)
        cells.append("-" if not record.h2d_gbps else f"{record.h2d_gbps:.1f} GB/s")
        cells.append(_seconds_cell(record.wait_seconds))
    else:
        cells.append(moved)
    return cells


def format_table(records: Iterable[RunRecord], *, detailed: bool = False) -> str:
    """A Markdown table with one row per record.

    Columns: mode, peak reserved, peak allocated, generation time, bytes moved; ``detailed`` adds the first
    (cold) run's time, the achieved H2D bandwidth and the time compute waited for weights.
    """
    header = ["mode", "peak reserved", "peak allocated", "generation time"]
    header += ["first run", "bytes moved", "H2D bandwidth", "weight wait"] if detailed else ["bytes moved"]
    rows = [header] + [_row(r, detailed) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


def environment() -> dict[str, Any]:
    """Versions and the device, for the record."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory"] = torch.cuda.get_device_properties(0).total_memory
    return info


def write_json(path: str | Path, records: Iterable[RunRecord], meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``{"meta": ..., "environment": ..., "runs": [...]}`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"meta": dict(meta or {}), "environment": environment(), "runs": [r.to_dict() for r in records]}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def write_markdown(
    path: str | Path, records: Iterable[RunRecord], *, title: str, command: str | None = None
) -> Path:
    """Write the detailed table under ``title``, with the command that produced it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    lines = [f"# {title}", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    device = env.get("gpu", "cpu")
    lines += [
        f"Device: {device}; torch {env['torch']}; diffusers {env.get('diffusers', 'not installed')}.",
        "",
    ]
    lines += [format_table(records, detailed=True), ""]
    path.write_text("\n".join(lines))
    return path


def plot_memory(path: str | Path, traces: Mapping[str, Sequence[tuple[float, int]]], *, title: str) -> Path:
    """Draw one line of allocated device memory (GiB) over time (s) per label, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display; set before pyplot is imported
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, trace in traces.items():
        if trace:
            ax.plot([t for t, _ in trace], [b / 2**30 for _, b in trace], label=label, linewidth=1.2)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("allocated GPU memory (GiB)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if any(traces.values()):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
