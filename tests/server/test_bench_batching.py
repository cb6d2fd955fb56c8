"""benchmarks/bench_batching.py's CPU path (--smoke, the demo): it runs, checks what it serves, and reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_batching.py"


def test_the_smoke_run_batches_and_reports(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_batching", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "batching.json"
    argv = ["--smoke", "--modes", "auto", "--clients", "4", "--requests", "1", "--max-batch", "4"]
    assert bench.main([*argv, "--batch-wait", "0.5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    auto = report["modes"]["auto"]
    on, off = auto["batched"], auto["unbatched"]
    assert on["ok"] == off["ok"] == 4 and not report["problems"]
    # The 4 clients' requests, all queued within the batch wait, share one call; unbatched, 4 calls.
    assert (on["calls"], on["mean_images_per_call"]) == (1, 4.0) and on["calls_by_batch"] == {"4": 1}
    assert (off["calls"], off["calls_by_batch"]) == (4, {"1": 4})
    assert set(on["measured_step_s"]) == {"4"} and on["measured_step_s"]["4"] > 0
    assert on["batched_vs_alone"]["max_abs_diff_levels"] <= 2
    assert [p["batch"] for p in auto["predicted"]] == [1, 2, 3, 4]
    assert auto["speedup"] > 0 and on["images_per_minute"] > 0
