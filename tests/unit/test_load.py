"""vramferry.load and filling the host store from checkpoint files: equal outputs on every saved layout, bytes read
from the files (never through the mapping), written or replaced mappings copied from memory, reads that survive
short reads and fail clearly on truncated files."""

from __future__ import annotations

import gc
import logging
import os

import numpy as np
import pytest
import torch
from torch import nn

import vramferry
from pipelines.diffusers_pipes import run
from vramferry.errors import LoadError
from vramferry.runtime import files
from vramferry.runtime.files import FileMap, FileReader, Region, plan_reads

CPU = {"onload_device": "cpu", "pin_memory": False}


def _mapped_paths(folder) -> list[str]:
    gc.collect()
    with open("/proc/self/maps") as maps:
        return [line for line in maps if str(folder) in line]


def _assert_equal_outputs(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


# --- every layout of the test bed, saved and loaded -------------------------------------------------------------


def test_load_equals_from_pretrained_then_apply(diffusers_pipeline, tmp_path):
    import diffusers

    _name, pipe, kwargs = diffusers_pipeline
    mode = "layerwise"  # every block a piece of its own: the finest packing
    pipe.save_pretrained(tmp_path)
    expected_pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    expected_pipe.set_progress_bar_config(disable=True)
    with vramferry.apply(expected_pipe, mode=mode, **CPU):
        expected = run(expected_pipe, kwargs)
    with vramferry.load(tmp_path, mode=mode, **CPU) as handle:
        loaded = handle.pipeline
        loaded.set_progress_bar_config(disable=True)
        assert isinstance(loaded, type(pipe))
        stats = handle.stats()
        # Nearly every byte came from the files (the rest: non-persistent buffers built in memory).
        assert stats.host_file_bytes > 0.9 * sum(
            p.numel() * p.element_size() for c in loaded.components.values() if isinstance(c, nn.Module)
            for p in c.parameters()
        )  # fmt: skip
        assert _mapped_paths(tmp_path) == [], "the checkpoint files are still mapped after load"
        _assert_equal_outputs(run(loaded, kwargs), expected)
    _assert_equal_outputs(run(loaded, kwargs), expected)  # and after remove()


def test_sharded_checkpoint_loads(tiny_flux, tmp_path):
    pipe, kwargs = tiny_flux
    pipe.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "transformer").glob("*.safetensors"))
    assert (
        len(shards) > 1
        and (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    )
    with vramferry.load(tmp_path, mode="layerwise", **CPU) as handle:
        handle.pipeline.set_progress_bar_config(disable=True)
        assert handle.stats().host_file_bytes > 0
        _assert_equal_outputs(run(handle.pipeline, kwargs), run(pipe, kwargs))


def test_load_with_another_dtype_copies_the_converted_weights(saved_flux_dir, tiny_flux):
    import diffusers

    _pipe, kwargs = tiny_flux
    expected_pipe = diffusers.DiffusionPipeline.from_pretrained(saved_flux_dir, dtype=torch.bfloat16)
    expected_pipe.set_progress_bar_config(disable=True)
    with vramferry.apply(expected_pipe, mode="model", **CPU):
        expected = run(expected_pipe, kwargs)
    with vramferry.load(saved_flux_dir, dtype="bfloat16", mode="model", **CPU) as handle:
        handle.pipeline.set_progress_bar_config(disable=True)
        assert handle.pipeline.transformer.dtype == torch.bfloat16
        stats = handle.stats()
        assert stats.host_file_bytes < stats.host_pageable_bytes / 2  # converted: copied, not read
        _assert_equal_outputs(run(handle.pipeline, kwargs), expected)


def test_load_demo_and_config(capsys):
    config = vramferry.OffloadConfig(mode="layerwise", **CPU)
    handle = vramferry.load(None, config, progress=True)
    try:
        assert handle.config.mode is vramferry.OffloadMode.LAYERWISE
        assert type(handle.pipeline).__name__ == "FluxPipeline"
        assert handle.stats().host_file_bytes == 0  # built in code: nothing to read
    finally:
        handle.remove()
    err = capsys.readouterr().err
    assert "packing weights" in err and "B/s" in err


def test_the_progress_bar_follows_the_log_level(capsys, caplog, saved_flux_dir):
    caplog.set_level(logging.WARNING, logger="vramferry")
    vramferry.load(saved_flux_dir, mode="model", **CPU).remove()
    assert "packing weights" not in capsys.readouterr().err
    caplog.set_level(logging.INFO, logger="vramferry")
    vramferry.load(saved_flux_dir, mode="model", **CPU).remove()
    assert "packing weights" in capsys.readouterr().err


def test_load_errors_name_the_model(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        vramferry.load(tmp_path / "missing", **CPU)


def test_load_on_a_gpu_where_there_is_none_says_so(saved_flux_dir, monkeypatch):
    from vramferry.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="onload_device='cpu'"):
        vramferry.load(saved_flux_dir)


# --- which tensors are read from files -------------------------------------------------------------------------


def _mapped_linear(tmp_path, name="w.safetensors") -> tuple[nn.Module, torch.Tensor, str]:
    from safetensors.torch import load_file, save_file

    weight = torch.randn(64, 32)
    path = str(tmp_path / name)
    save_file({"weight": weight, "bias": torch.randn(64)}, path)
    module = nn.Linear(32, 64)
    module.load_state_dict(load_file(path), assign=True)  # parameters are views of the mapped file
    return module, weight, path


def _tiny_pipeline(module: nn.Module):
    class Pipe:
        _dit_modules = ["transformer"]
        _encoder_modules: list[str] = []
        _vae_modules: list[str] = []

    pipe = Pipe()
    pipe.transformer = module
    return pipe


def test_a_mapped_tensor_is_found_in_its_file(tmp_path):
    module, weight, path = _mapped_linear(tmp_path)
    region = FileMap.current().region(module.weight.data)
    assert region is not None and region.path == path and region.nbytes == weight.numel() * 4
    with open(path, "rb") as f:
        f.seek(region.offset)
        assert f.read(region.nbytes) == weight.numpy().tobytes()
    assert FileMap.current().region(torch.randn(8)) is None  # anonymous memory
    assert FileMap.current().region(module.weight.data.t()) is None  # not contiguous


def test_a_written_mapping_is_copied_from_memory(tmp_path):
    module, weight, _path = _mapped_linear(tmp_path)
    with torch.no_grad():
        module.weight.add_(1.0)  # private mapping: the page now differs from the file
    assert FileMap.current().region(module.weight.data) is None
    handle = vramferry.apply(_tiny_pipeline(module), mode="model", **CPU)
    try:
        torch.testing.assert_close(module.weight.data, weight + 1.0, rtol=0, atol=0)
    finally:
        handle.remove()


def test_a_replaced_file_is_copied_from_memory(tmp_path):
    from safetensors.torch import save_file

    module, weight, path = _mapped_linear(tmp_path)
    save_file({"weight": torch.zeros(64, 32), "bias": torch.zeros(64)}, path + ".new")
    os.replace(path + ".new", path)  # the mapping still shows the old file
    assert FileMap.current().region(module.weight.data) is None
    with vramferry.apply(_tiny_pipeline(module), mode="model", **CPU) as handle:
        assert handle.stats().host_file_bytes == 0
        torch.testing.assert_close(module.weight.data, weight, rtol=0, atol=0)


def test_apply_reads_mapped_weights_from_the_file(tmp_path):
    module, weight, _path = _mapped_linear(tmp_path)
    with vramferry.apply(_tiny_pipeline(module), mode="model", **CPU) as handle:
        assert handle.stats().host_file_bytes == (64 * 32 + 64) * 4
        assert FileMap.current().region(module.weight.data) is None  # bound to the host store now
        torch.testing.assert_close(module.weight.data, weight, rtol=0, atol=0)
    assert _mapped_paths(tmp_path) == []


def test_large_tensors_in_memory_are_copied_on_threads_exactly():
    module = nn.Sequential(nn.Linear(1024, 4096), nn.Linear(4096, 1024))  # 32 MiB: several copy chunks
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    with vramferry.apply(_tiny_pipeline(module), mode="model", **CPU) as handle:
        assert handle.stats().host_file_bytes == 0
        for name, p in module.named_parameters():
            torch.testing.assert_close(p.data, before[name], rtol=0, atol=0)


def _piece(module: nn.Module):
    from vramferry.runtime.arenas import host_buffer
    from vramferry.runtime.pieces import Piece
    from vramferry.runtime.refs import collect_refs

    piece = Piece("piece", "component", collect_refs(module, set(), {})[0])
    piece.host = host_buffer(piece.layout())
    return piece


def test_a_fill_hands_its_arena_on_once_its_bytes_landed_while_the_next_fill_runs():
    from vramferry.runtime.fill import Filler

    first, second = nn.Linear(64, 32), nn.Linear(16, 8)
    expected = {id(m): [p.detach().clone() for p in m.parameters()] for m in (first, second)}
    pieces = {id(m): _piece(m) for m in (first, second)}
    events: list[str] = []

    def landed(module: nn.Module, name: str) -> None:
        arena = pieces[id(module)].host
        for param, want in zip(module.parameters(), expected[id(module)], strict=True):
            assert arena.data_ptr() <= param.data_ptr() < arena.data_ptr() + arena.numel()  # rebound
            torch.testing.assert_close(param.data, want, rtol=0, atol=0)
        events.append(name)

    filler = Filler(FileMap([]))
    try:
        filler.fill([pieces[id(first)]], then=lambda: landed(first, "first landed"))
        events.append("first returned")
        filler.fill([pieces[id(second)]], then=lambda: landed(second, "second landed"))
        events.append("second returned")
        filler.drain()
    finally:
        filler.close()
    assert events == ["first returned", "first landed", "second returned", "second landed"]


# --- reads -----------------------------------------------------------------------------------------------------


def _file(tmp_path, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return str(path), data


def test_contiguous_regions_are_read_by_one_call_each_chunk(tmp_path):
    path, _data = _file(tmp_path, 4096)
    targets = [torch.empty(n, dtype=torch.uint8) for n in (100, 200, 300)]
    items = [(Region(path, 1000, 100), targets[0]), (Region(path, 1100, 200), targets[1])]
    items.append((Region(path, 2000, 300), targets[2]))  # a gap before it: a read of its own
    assert [(r.offset, r.nbytes) for r in plan_reads(items)] == [(1000, 300), (2000, 300)]
    assert [(r.offset, r.nbytes) for r in plan_reads(items, chunk=128)] == [
        (1000, 100), (1100, 128), (1228, 72), (2000, 128), (2128, 128), (2256, 44),
    ]  # fmt: skip


@pytest.mark.parametrize("threads", [0, 3])
def test_reads_land_where_they_belong(tmp_path, monkeypatch, threads):
    from concurrent.futures import ThreadPoolExecutor

    path, data = _file(tmp_path, 1 << 16)
    real = os.preadv
    monkeypatch.setattr(files.os, "preadv", lambda fd, bufs, off: _short(real, fd, bufs, off))
    spans = [(0, 5000), (5000, 3), (9000, 20000), (40000, 25536)]
    items = [(Region(path, lo, n), torch.empty(n, dtype=torch.uint8)) for lo, n in spans]
    reader = FileReader()
    seen: list[int] = []
    pool = ThreadPoolExecutor(threads) if threads else None
    try:
        reader.read(items, pool, seen.append)
    finally:
        reader.close()
        if pool is not None:
            pool.shutdown()
    assert sum(seen) == sum(n for _lo, n in spans)
    for (lo, n), (_region, target) in zip(spans, items, strict=True):
        assert bytes(target.numpy()) == data[lo : lo + n]


def _short(real, fd, buffers, offset):
    """A preadv that reads at most 777 bytes per call, as a slow or interrupted file system may."""
    budget, kept = 777, []
    for buf in buffers:
        if budget <= 0:
            break
        kept.append(buf[:budget])
        budget -= len(kept[-1])
    return real(fd, kept, offset)


def test_a_truncated_file_is_named(tmp_path):
    path, _data = _file(tmp_path, 1000)
    reader = FileReader()
    with pytest.raises(LoadError, match="data.bin.*ends before byte 1000"):
        reader.read([(Region(path, 900, 200), torch.empty(200, dtype=torch.uint8))])
    reader.close()


def test_a_missing_file_is_named(tmp_path):
    reader = FileReader()
    with pytest.raises(LoadError, match="gone.bin"):
        reader.read([(Region(str(tmp_path / "gone.bin"), 0, 8), torch.empty(8, dtype=torch.uint8))])


# --- the README's example and the CLI ---------------------------------------------------------------------------


def test_the_readme_load_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    from pipelines.diffusers_pipes import build_flux

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Straight from the checkpoint: `vramferry.load`", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    folder = tmp_path / "FLUX.1-dev"
    build_flux()[0].to(torch.bfloat16).save_pretrained(folder)  # bf16 files, as FLUX.1-dev's
    for old, new in [
        ('"/models/FLUX.1-dev"', repr(str(folder))),
        ("vramferry.OffloadConfig(", 'vramferry.OffloadConfig(onload_device="cpu", pin_memory=False, '),
        ("num_inference_steps=28", "num_inference_steps=1, height=32, width=32"),
    ]:
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme"}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["handle"].stats().host_file_bytes > 0
    assert scope["image"].size == (32, 32)
    scope["handle"].remove()


@pytest.mark.parametrize("quiet", [False, True])
def test_generate_with_a_model_folder_shows_the_loading_bar(saved_flux_dir, tmp_path, capsys, quiet):
    from vramferry.cli import main

    out = tmp_path / "x.png"
    argv = ["generate", "--model", str(saved_flux_dir), "--prompt", "a photo of a cat", "--steps", "1"]
    argv += ["--size", "32x32", "--offload", "model", "--out", str(out), *(["-q"] if quiet else [])]
    assert main(argv) == 0 and out.exists()
    assert ("packing weights" in capsys.readouterr().err) is not quiet


def test_prefetch_starts_only_when_the_files_fit(tmp_path, monkeypatch):
    path, _data = _file(tmp_path, 1 << 20)
    thread = files.prefetch([path])
    assert thread is not None
    thread.join(timeout=30)
    assert not thread.is_alive()
    monkeypatch.setattr(files, "available_memory", lambda: 1 << 20)  # half of it is less than the file
    assert files.prefetch([path]) is None
    assert files.prefetch([str(tmp_path / "missing.safetensors")]) is None


def test_stats_say_where_apply_spent_its_time(saved_flux_dir):
    with vramferry.load(saved_flux_dir, mode="layerwise", **CPU) as handle:
        seconds = handle.stats().apply_seconds
    assert {"discovery", "planning", "host store", "of which filling", "device loads and hooks"} <= set(seconds)
    assert all(value >= 0 for value in seconds.values())
    assert seconds["of which filling"] <= seconds["host store"]
    assert seconds["of which filling"] == pytest.approx(handle.stats().host_fill_seconds, abs=1e-3)


# --- building the modules without reading their weights ---------------------------------------------------------


def _resident_kib(folder) -> int:
    """KiB of ``folder``'s file pages mapped into this process (pages some code touched)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                inside = str(folder) in line
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.parametrize("untouched", [False, True])
@pytest.mark.parametrize("component", ["transformer", "text_encoder_2"])  # a diffusers and a transformers model
def test_a_model_built_for_load_touches_none_of_its_file(saved_flux_dir, component, untouched):
    import diffusers
    import transformers
    from safetensors.torch import load

    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("needs /proc/self/smaps (Linux) to see which file pages are mapped")
    folder = saved_flux_dir / component
    cls = {"transformer": diffusers.FluxTransformer2DModel, "text_encoder_2": transformers.T5EncoderModel}[component]
    (weights,) = folder.glob("*.safetensors")
    expected = load(weights.read_bytes())  # read, not mapped
    gc.collect()
    if untouched:
        with files.untouched_safetensors():
            model = cls.from_pretrained(folder)
        assert _resident_kib(folder) == 0  # the host store reads the bytes from the file, in order
    else:
        model = cls.from_pretrained(folder)
        assert _resident_kib(folder) > 0  # safetensors' readers touch every tensor they return
    state = model.state_dict()
    assert expected.keys() <= state.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def test_transformers_reads_shapes_and_dtypes_through_the_untouched_views(saved_flux_dir):
    import transformers.modeling_utils as loading
    from safetensors.torch import load

    (weights,) = (saved_flux_dir / "text_encoder_2").glob("*.safetensors")
    expected = load(weights.read_bytes())
    with files.untouched_safetensors():
        # transformers reads the dtype of a checkpoint this way when asked for dtype="auto"
        found = loading.load_state_dict(str(weights), map_location="meta")
        values = loading.load_state_dict(str(weights))
    assert {k: (v.shape, v.dtype) for k, v in found.items()} == {k: (v.shape, v.dtype) for k, v in expected.items()}
    for name, tensor in expected.items():
        torch.testing.assert_close(values[name], tensor, rtol=0, atol=0, msg=name)


def test_files_the_reader_cannot_map_are_loaded_by_safetensors(tmp_path):
    import json
    import struct

    from safetensors.torch import load_file, save_file

    good = str(tmp_path / "good.safetensors")
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, good)
    header = json.dumps({"w": {"dtype": "F8_E8M0", "shape": [4], "data_offsets": [0, 4]}}).encode()
    odd = str(tmp_path / "odd.safetensors")
    with open(odd, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes(4))
    assert files.map_safetensors(odd) is None  # a dtype this reader does not know
    assert files.map_safetensors(str(tmp_path / "missing.safetensors")) is None
    mapped = files.map_safetensors(good)
    torch.testing.assert_close(mapped["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3), rtol=0, atol=0)
    with files.untouched_safetensors():
        import safetensors.torch as st

        assert st.load_file is not load_file
        torch.testing.assert_close(st.load_file(good)["w"], mapped["w"], rtol=0, atol=0)
        assert st.load_file(odd)["w"].dtype == load_file(odd)["w"].dtype  # safetensors' own loader
    assert st.load_file is load_file


def test_the_cli_builds_a_model_folder_without_reading_its_weights(saved_flux_dir):
    import argparse

    from vramferry.cli_options import load as cli_load

    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("needs /proc/self/smaps (Linux) to see which file pages are mapped")
    gc.collect()
    args = argparse.Namespace(model=str(saved_flux_dir), dtype=None, verbose=False, debug=False)
    pipe = cli_load(args, vramferry.OffloadConfig(onload_device="cpu", pin_memory=False))
    assert _resident_kib(saved_flux_dir) == 0  # apply then fills the host store from the files
    assert type(pipe).__name__ == "FluxPipeline"


def test_generate_with_a_model_folder_gives_the_image_of_from_pretrained(saved_flux_dir, tmp_path):
    import diffusers
    from PIL import Image

    from vramferry.cli import main

    out = tmp_path / "cli.png"
    argv = ["generate", "--model", str(saved_flux_dir), "--prompt", "a cat", "--size", "32x32", "--steps", "2"]
    argv += ["--seed", "3", "--offload", "layerwise", "--onload-device", "cpu", "--no-pin-memory", "-q"]
    assert main([*argv, "--out", str(out)]) == 0
    pipe = diffusers.DiffusionPipeline.from_pretrained(saved_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    seeded = torch.Generator().manual_seed(3)
    expected = pipe("a cat", height=32, width=32, num_inference_steps=2, generator=seeded).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_prepare_runs_on_the_built_pipeline_before_its_weights_are_packed(saved_flux_dir, tiny_flux, caplog):
    import diffusers

    peft = pytest.importorskip("peft")
    _pipe, kwargs = tiny_flux

    def add_adapter(pipe):
        torch.manual_seed(1)
        config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"], init_lora_weights=False)
        pipe.transformer.add_adapter(config, adapter_name="a")

    plain = diffusers.DiffusionPipeline.from_pretrained(saved_flux_dir)
    add_adapter(plain)
    with vramferry.apply(plain, **CPU):  # the same arenas' alignment: the same kernels, bit for bit
        expected = run(plain, kwargs)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vramferry"):
        with vramferry.load(saved_flux_dir, prepare=add_adapter, **CPU) as handle:
            got = run(handle.pipeline, kwargs)
    # Packed once with the adapter in place: nothing was found changed and packed again at the request.
    assert not [r.getMessage() for r in caplog.records if "again after their tensors changed" in r.getMessage()]
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_an_error_in_prepare_ends_the_load(saved_flux_dir):
    def refuse(pipe):
        raise ValueError(f"{type(pipe).__name__} cannot make 7x7")

    with pytest.raises(ValueError, match="FluxPipeline cannot make 7x7"):
        vramferry.load(saved_flux_dir, prepare=refuse, **CPU)
