"""Images per second by batch size: the streamed bytes of a step do not grow with the batch, so a transfer-bound
step serves a second image almost free; the curve stops at the first batch whose activations do not fit."""

from __future__ import annotations

import json

from vramferry.cli import main
from vramferry.config import OffloadConfig
from vramferry.planning import plan
from vramferry.planning.archs import get_arch
from vramferry.planning.devices import PRESETS
from vramferry.planning.throughput import BatchPoint, best_batch, throughput


def _curve(config: OffloadConfig, max_batch: int):
    spec = get_arch("flux1-dev")
    inventory = spec.inventory()
    return throughput(
        lambda w: plan(inventory, config, device=PRESETS["h100"], workload=w), spec.with_workload(), max_batch
    )


def test_a_transfer_bound_step_serves_a_second_image_almost_free_until_compute_overtakes():
    points = _curve(OffloadConfig(mode="layerwise"), 4)
    assert [p.batch for p in points] == [1, 2, 3, 4] and all(p.error is None for p in points)
    one, two, four = points[0], points[1], points[3]
    assert two.step_s < 1.05 * one.step_s  # the 23.8 GB streamed per step hide the second image's compute
    assert two.images_per_s > 1.9 * one.images_per_s
    assert four.step_s > 1.5 * one.step_s  # compute-bound by then
    chosen = best_batch(points)
    assert 2 <= chosen < 4
    assert points[chosen - 1].images_per_s >= 1.05 * points[chosen - 2].images_per_s


def test_the_curve_stops_at_the_first_batch_that_does_not_fit_the_budget():
    points = _curve(OffloadConfig(mode="auto", vram_budget="16GiB"), 12)
    last = points[-1]
    assert last.error is not None and "16.00 GiB" in last.error and last.images_per_s is None
    assert all(p.error is None and p.peak_bytes <= 16 * 2**30 for p in points[:-1])
    assert best_batch(points) <= len(points) - 1


def test_best_batch_is_one_when_a_larger_batch_gains_too_little():
    flat = [BatchPoint(1, 0.1, 1.0, 1), BatchPoint(2, 0.2, 1.98, 1)]  # 1.0 -> 1.01 images/s
    assert best_batch(flat) == 1
    assert best_batch([BatchPoint(1, error="does not fit")]) == 1


def test_plan_throughput_prints_the_curve_and_batch_sizes_the_plan(capsys):
    flags = ["plan", "--arch", "flux1-dev", "--gpu", "h100", "--offload", "layerwise"]
    assert main([*flags, "--throughput", "3"]) == 0
    out = capsys.readouterr().out
    assert "throughput by batch size (predicted):" in out and "<- largest batch still gaining" in out
    assert main([*flags, "--throughput", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["batch"] for p in data["throughput"]] == [1, 2]
    assert data["throughput"][1]["images_per_s"] > data["throughput"][0]["images_per_s"]
    assert main([*flags, "--batch", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["workload"]["batch"] == 4
