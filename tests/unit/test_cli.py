"""The ``vramferry`` command line, run in process through ``main([...])``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from vramferry import OffloadConfig
from vramferry.cli import build_parser, main
from vramferry.cli_options import OFFLOAD_FLAGS, offload_config
from vramferry.report import NOT_ON_CUDA, RunRecord, format_table
from vramferry.server.generation import save_outputs


def test_every_config_field_has_exactly_one_flag():
    assert set(OFFLOAD_FLAGS) == {f.name for f in dataclasses.fields(OffloadConfig)}
    flags = [flag for flag, _ in OFFLOAD_FLAGS.values()]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize("command", ["plan", "generate", "bench", "serve"])
def test_flags_map_to_config_fields(command):
    args = build_parser().parse_args(
        [command, "--offload", "layerwise", "--vram-budget", "12GiB", "--onload-device", "cpu",
         "--no-pin-memory", "--ram-budget", "64GiB", "--no-prefetch-components", "--prefetch-depth", "3",
         "--keep-resident", "vae,text_encoder", "--block-attrs", "transformer=a,b", "--safety-margin", "2GiB",
         "--verify", "--strict"]
    )  # fmt: skip
    assert offload_config(args) == OffloadConfig(
        mode="layerwise", vram_budget="12GiB", onload_device="cpu", pin_memory=False, host_memory_limit="64GiB",
        prefetch_components=False, prefetch_depth=3, keep_resident=("vae", "text_encoder"),
        block_attrs={"transformer": ("a", "b")}, safety_margin="2GiB", verify=True, strict=True,
    )  # fmt: skip


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(OffloadConfig(mode="model", vram_budget="8GiB", verify=True).to_json())
    args = build_parser().parse_args(["plan", "--config", str(path), "--vram-budget", "10GiB"])
    assert offload_config(args) == OffloadConfig(mode="model", vram_budget="10GiB", verify=True)
    assert offload_config(build_parser().parse_args(["plan"])) == OffloadConfig()


def test_plan_demo_text(capsys):
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "FluxPipeline" in out
    assert "dit" in out and "transformer" in out and "encoder" in out and "vae" in out
    assert "blocks of transformer:" in out
    assert "found by" in out


def test_plan_demo_json(capsys):
    assert main(["plan", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pipeline_class"] == "FluxPipeline"
    roles = {c["name"]: c["role"] for c in data["components"]}
    assert roles["transformer"] == "dit"
    assert all(c["bytes"] > 0 and c["dtype"] for c in data["components"])
    assert data["blocks"]["transformer"]["count"] > 0
    assert "plan" not in data


def test_plan_demo_with_mode_prints_the_plan(capsys):
    assert main(["plan", "--json", "--offload", "layerwise"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["mode"] == "layerwise"
    assert data["config"]["mode"] == "layerwise"


def test_plan_arch_with_budget_and_gpu(capsys):
    assert main(["plan", "--arch", "flux1-dev", "--vram-budget", "16GiB", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert "transformer" in out and "57 in transformer_blocks + single_transformer_blocks" in out
    assert "GiB" in out
    assert main(["plan", "--arch", "flux1-dev", "--vram-budget", "16GiB", "--gpu", "h100", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["predicted_peak_bytes"] <= 16 * 2**30
    assert data["workload"]["height"] == 1024


def test_plan_arch_list(capsys):
    assert main(["plan", "--arch", "list"]) == 0
    assert "flux1-dev" in capsys.readouterr().out


def test_generate_demo_writes_image_and_table(tmp_path, capsys):
    out = tmp_path / "cat.png"
    code = main(["generate", "--out", str(out), "--steps", "1", "--size", "64x48", "--offload", "none", "-q"])
    assert code == 0
    assert Image.open(out).size == (64, 48)
    captured = capsys.readouterr()
    for column in ("mode", "peak reserved", "peak allocated", "generation time", "bytes moved"):
        assert column in captured.out
    if not torch.cuda.is_available():
        assert NOT_ON_CUDA in captured.out
        assert "CUDA is not available" in captured.err


def test_generate_demo_with_offload_on_cpu(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--out", str(out), "--steps", "2", "--size", "32x32", "--offload", "model"]) == 0
    assert out.exists()
    captured = capsys.readouterr()
    assert "| model" in captured.out
    assert "denoising" in captured.err  # the progress bar


def test_bench_needs_cuda(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--out-dir", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--offload", "fast"],
        ["generate", "--size", "big"],
        ["plan", "--prefetch-depth", "0"],
        ["frobnicate"],
    ],
)
def test_bad_flag_is_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error:")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["plan", "--vram-budget", "banana"], "vram_budget"),
        (["plan", "--arch", "flux9"], "flux9"),
        (["plan", "--gpu", "nosuchgpu", "--arch", "flux1-dev"], "nosuchgpu"),
        (["generate", "--model", "/no/such/folder", "--prompt", "x"], "/no/such/folder"),
        (["plan", "--config", "/no/such.json"], "--config"),
    ],
)
def test_library_errors_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("note:")]
    assert len(errors) == 1, err
    assert errors[0].startswith("error:") and needle in errors[0]
    assert "Traceback" not in err


def test_debug_shows_the_exception():
    with pytest.raises(ValueError, match="vram_budget"):
        main(["--debug", "plan", "--vram-budget", "banana"])
    with pytest.raises(ValueError, match="vram_budget"):
        main(["plan", "--debug", "--vram-budget", "banana"])


def test_python_dash_m():
    result = subprocess.run(
        [sys.executable, "-m", "vramferry", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert result.stdout.startswith("vramferry ")


def test_save_outputs_video(tmp_path):
    frames = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(3)]
    gif = save_outputs([frames], tmp_path / "clip.gif")
    assert gif == [tmp_path / "clip.gif"]
    assert Image.open(gif[0]).n_frames == 3
    pngs = save_outputs([frames], tmp_path / "clip.png")
    assert [p.name for p in pngs] == ["clip_0000.png", "clip_0001.png", "clip_0002.png"]


def test_table_formats_cpu_and_failures():
    table = format_table(
        [
            RunRecord("none", seconds=1.5, bytes_h2d=0),
            RunRecord(
                "layerwise", seconds=2.0, peak_allocated=2**30, peak_reserved=2**31, bytes_h2d=5 * 2**30
            ),
            RunRecord("model", error="out of memory"),
        ],
        detailed=True,
    )
    lines = table.splitlines()
    assert len(lines) == 5
    assert NOT_ON_CUDA in lines[2]
    assert "1.00 GiB" in lines[3] and "5.00 GiB" in lines[3]
    assert "failed: out of memory" in lines[4]


def test_serve_builds_the_app_from_flags(monkeypatch, capsys):
    import uvicorn
    from fastapi.testclient import TestClient

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    code = main(["serve", "--port", "9999", "--api-key", "k", "--max-queue", "3", "--timeout", "60",
                 "--offload", "model", "--served-model-name", "demo"])  # fmt: skip
    assert code == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 9999)
    assert seen["http"].header_timeout == seen["app"].state.settings.header_timeout  # uvicorn_options
    settings = seen["app"].state.settings
    assert (settings.api_key, settings.max_queue, settings.timeout, settings.model_name) == (
        "k",
        3,
        60.0,
        "demo",
    )
    assert settings.default_size == (256, 256)
    with TestClient(seen["app"]) as client:
        auth = {"Authorization": "Bearer k"}
        r = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "num_inference_steps": 1},
                        headers=auth)  # fmt: skip
        assert r.status_code == 200, r.text
        metrics = client.get("/metrics", headers=auth).text
    moved = [line for line in metrics.splitlines() if line.startswith("vramferry_weight_bytes_moved_total")]
    assert float(moved[0].split()[-1]) > 0  # the model-offload handle reported its copies


def test_the_cli_turns_on_expandable_segments_unless_configured(monkeypatch, capsys):
    from vramferry.runtime.probe import expandable_segments

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert not expandable_segments()
    assert main(["plan"]) == 0
    assert expandable_segments()  # the planner sees it, as the allocator will
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert main(["plan"]) == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"  # the user's setting is kept


def _no_loading(monkeypatch):
    """Make any model load fail the test: these command lines must be rejected before it."""
    import vramferry.cli

    def load(args, config=None):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(vramferry.cli, "load", load)


def _error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if not line.startswith("note:")]
    assert len(errors) == 1, err
    assert errors[0].startswith("error:") and "Traceback" not in err
    return errors[0]


@pytest.mark.parametrize(
    ("size", "nearest"), [("7x7", "the nearest are 16x16"), ("100x100", "the nearest are 96x96 or 112x112")]
)
def test_generate_rejects_a_size_the_pipeline_cannot_make(size, nearest, monkeypatch, tmp_path, capsys):
    import vramferry.server.generation

    def generate(*args, **kwargs):
        raise AssertionError("denoising ran")

    monkeypatch.setattr(vramferry.server.generation, "generate", generate)
    out = tmp_path / "x.png"
    assert main(["generate", "--size", size, "--out", str(out), "-q", "--offload", "none"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"--size {size}" in line and "multiples of 16" in line and nearest in line
    assert not out.exists()  # never a silently resized image


def test_generate_checks_the_prompt_before_loading(monkeypatch, tmp_path, capsys):
    _no_loading(monkeypatch)
    assert main(["generate", "--model", str(tmp_path)]) == 2
    assert "--prompt is required" in _error_line(capsys.readouterr().err)


def test_serve_without_the_server_extra_names_it(monkeypatch, capsys):
    _no_loading(monkeypatch)
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    assert main(["serve"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert "'uvicorn'" in line and "vramferry[server]" in line


def test_serve_reports_a_busy_port_before_loading(monkeypatch, capsys):
    import socket

    _no_loading(monkeypatch)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"--port {port}" in line and "in use" in line


def test_serve_checks_and_plans_its_sizes(monkeypatch, capsys):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app))
    assert main(["serve", "--sizes", "100x100", "--onload-device", "cpu"]) == 2
    assert "--sizes 100x100" in _error_line(capsys.readouterr().err) and not seen
    assert main(["serve", "--sizes", "64x64,128x64", "--onload-device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "planned 64x64: " in err and "planned 128x64: " in err and "peak" in err


def test_serve_allowed_hosts(monkeypatch, capsys):
    from vramferry.server import ServerSettings

    args = build_parser().parse_args(["serve", "--allowed-hosts", "localhost, images.example.com"])
    assert args.allowed_hosts == ("localhost", "images.example.com")
    if "allowed_hosts" not in {f.name for f in dataclasses.fields(ServerSettings)}:
        pytest.skip("ServerSettings has no allowed_hosts field yet")
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app))
    assert main(["serve", "--allowed-hosts", "localhost,images.example.com", "--onload-device", "cpu"]) == 0
    assert tuple(seen["app"].state.settings.allowed_hosts) == ("localhost", "images.example.com")


def test_plan_without_gpu_is_the_plan_of_the_assumed_h100(monkeypatch, capsys):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    plans = {}
    for extra in ([], ["--gpu", "h100"]):
        assert main(["plan", "--arch", "flux1-dev", "--vram-budget", "16GiB", "--json", *extra]) == 0
        plans[bool(extra)] = json.loads(capsys.readouterr().out)["plan"]
    assumed, given = plans[False], plans[True]
    device = [note for note in assumed.pop("notes") if note.startswith("device:")]
    assert device == [
        n + " (assumed: pass --gpu for another GPU)" for n in given.pop("notes") if "device:" in n
    ]
    assert assumed == given  # the same placement, budget allowance and predictions


def test_plan_messages_name_flags_and_show_small_sizes(capsys):
    assert main(["plan", "--vram-budget", "1MiB"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "vram_budget 1.00 MiB is below" in line and "--vram-budget" in line
    assert not re.search(r"(?<![\d.])0\.00 GiB", line)
    assert main(["plan", "--offload", "layerwise", "--vram-budget", "1MiB"]) == 2
    assert "--offload auto" in capsys.readouterr().err
    assert main(["plan", "--vram-budget", "50%"]) == 0  # of the assumed h100's memory
    out = capsys.readouterr().out
    assert "device=" not in out and "free_bytes=" not in out
    assert not re.search(r"(?<![\d.])0\.00 GiB", out)


def test_format_size():
    from vramferry.planning.format import format_size

    assert format_size(2**20) == "1.00 MiB"
    assert format_size(16 * 2**30) == "16.00 GiB"
    assert format_size(0.16 * 2**30) == "0.16 GiB"
    assert format_size(2**30 + 1, up=True) == "1.01 GiB"
    assert format_size(5) == "5 B"


def test_workload_is_exported():
    import vramferry
    from vramferry.planning.workload import Workload

    assert vramferry.Workload is Workload and "Workload" in vramferry.__all__
