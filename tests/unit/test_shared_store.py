"""One host copy for several processes (``share_host_store``): arenas in shared memory, found by the second
process that loads the same checkpoint, private to each process once written to, deleted by the last one."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import vramferry
from pipelines.diffusers_pipes import run

CPU = {"onload_device": "cpu", "pin_memory": False, "mode": "layerwise"}
HERE = Path(__file__).resolve().parents[1]


@pytest.fixture
def share_dir(tmp_path):
    """A fresh folder in shared memory (``/dev/shm``) where there is one, else on disk (the same semantics)."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        folder = tempfile.mkdtemp(prefix="vramferry-test-", dir="/dev/shm")
    else:
        folder = str(tmp_path / "shm")
        os.mkdir(folder)
    yield folder
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))
    os.rmdir(folder)


def _arenas(folder: str) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("vramferry-"))


def _expected(saved_flux_dir, tiny_flux):
    _pipe, kwargs = tiny_flux
    with vramferry.load(saved_flux_dir, **CPU) as handle:
        handle.pipeline.set_progress_bar_config(disable=True)
        return run(handle.pipeline, kwargs)


def test_a_second_pipeline_of_the_same_checkpoint_maps_the_first_ones_arenas(saved_flux_dir, tiny_flux, share_dir):
    _pipe, kwargs = tiny_flux
    expected = _expected(saved_flux_dir, tiny_flux)
    first = vramferry.load(saved_flux_dir, share_host_store=share_dir, **CPU)
    second = vramferry.load(saved_flux_dir, share_host_store=share_dir, **CPU)
    try:
        one, two = first.stats(), second.stats()
        # Every component's weights come from the files: all of the store is shared, found by the second.
        assert one.host_shared_bytes > 0.9 * (one.host_pinned_bytes + one.host_pageable_bytes)
        assert one.host_shared_found_bytes == 0 and one.host_file_bytes > 0
        assert two.host_shared_found_bytes == two.host_shared_bytes == one.host_shared_bytes
        assert two.host_file_bytes < 0.1 * one.host_file_bytes  # it read none of the shared weights
        assert len(_arenas(share_dir)) >= 4  # transformer, two text encoders, VAE
        for handle in (first, second):
            handle.pipeline.set_progress_bar_config(disable=True)
            got = run(handle.pipeline, kwargs)
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key])
        first.remove()
        assert _arenas(share_dir), "the second pipeline still holds the arenas"
        got = run(second.pipeline, kwargs)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    finally:
        first.remove()
        second.remove()
    assert _arenas(share_dir) == []  # the last one let go: the files are deleted


def test_a_weight_changed_in_one_pipeline_stays_in_it(saved_flux_dir, tiny_flux, share_dir):
    _pipe, kwargs = tiny_flux
    expected = _expected(saved_flux_dir, tiny_flux)
    with (
        vramferry.load(saved_flux_dir, share_host_store=share_dir, **CPU) as first,
        vramferry.load(saved_flux_dir, share_host_store=share_dir, **CPU) as second,
    ):
        weight = first.pipeline.transformer.proj_out.weight
        with torch.no_grad():
            weight.data.mul_(2.0)  # in place, on its host copy (layerwise: between loads)
        second.pipeline.set_progress_bar_config(disable=True)
        got = run(second.pipeline, kwargs)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
        assert not torch.equal(weight, second.pipeline.transformer.proj_out.weight)


def _mappings(folder: str) -> dict[str, set[str]]:
    """Each file of ``folder`` mapped into this process, with the permissions of its mappings."""
    found: dict[str, set[str]] = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith(folder + "/"):
                found.setdefault(fields[5], set()).add(fields[1])
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_the_copies_to_the_device_read_a_shared_read_only_mapping(saved_flux_dir, share_dir):
    """A device pins (page-locks) what it copies from: Linux copies every page of a private mapping pinned for
    long, even read-only, so the store copies from a shared read-only mapping of each arena, while the tensors
    view a private one (their writes stay in this process)."""
    with vramferry.load(saved_flux_dir, share_host_store=share_dir, **CPU):
        mapped = _mappings(share_dir)
        assert sorted(os.path.basename(path) for path in mapped) == _arenas(share_dir)
        for path, perms in mapped.items():
            assert "r--s" in perms, (path, perms)  # the copies' source
            assert "rw-p" in perms, (path, perms)  # the tensors' views


def test_an_arena_left_unfinished_is_filled_again(saved_flux_dir, tiny_flux, share_dir):
    _pipe, kwargs = tiny_flux
    expected = _expected(saved_flux_dir, tiny_flux)
    with vramferry.load(saved_flux_dir, share_host_store=share_dir, **CPU):
        names = _arenas(share_dir)
        for name in names:  # keep the files past the handle
            os.link(os.path.join(share_dir, name), os.path.join(share_dir, "kept-" + name))
    for name in names:
        path = os.path.join(share_dir, name)
        os.replace(os.path.join(share_dir, "kept-" + name), path)
        with open(path, "r+b") as f:  # a process killed while filling: no trailer
            f.truncate(os.path.getsize(path) - 64)
            f.truncate(os.path.getsize(path) + 64)
    with vramferry.load(saved_flux_dir, share_host_store=share_dir, **CPU) as handle:
        assert handle.stats().host_shared_found_bytes == 0  # every arena read again from the files
        handle.pipeline.set_progress_bar_config(disable=True)
        got = run(handle.pipeline, kwargs)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    assert _arenas(share_dir) == []


def _holds(folder: str, name: str, data: bytes) -> bool:
    path = os.path.join(folder, name)
    return os.path.exists(path) and os.path.getsize(path) == len(data) and Path(path).read_bytes() == data


def test_an_arena_another_process_is_filling_is_passed_over_and_found_filled(saved_flux_dir, tiny_flux, share_dir):
    import fcntl
    import threading
    import time

    _pipe, kwargs = tiny_flux
    expected = _expected(saved_flux_dir, tiny_flux)
    with vramferry.load(saved_flux_dir, share_host_store=share_dir, **CPU):
        kept = {name: Path(share_dir, name).read_bytes() for name in _arenas(share_dir)}  # complete arenas
    busy = max(kept, key=lambda name: len(kept[name]))
    fd = os.open(os.path.join(share_dir, busy), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a process that is filling it, nothing written yet
    others_filled = threading.Event()

    def other_process() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not others_filled.is_set():
            if all(_holds(share_dir, name, data) for name, data in kept.items() if name != busy):
                others_filled.set()
                os.pwrite(fd, kept[busy], 0)  # its bytes, and the trailer that marks it complete
            time.sleep(0.02)
        os.close(fd)  # lets go of it

    thread = threading.Thread(target=other_process)
    thread.start()
    try:
        with vramferry.load(saved_flux_dir, share_host_store=share_dir, **CPU) as handle:
            stats = handle.stats()
            handle.pipeline.set_progress_bar_config(disable=True)
            got = run(handle.pipeline, kwargs)
    finally:
        thread.join()
    assert others_filled.is_set(), "the load waited for the busy arena instead of filling the others first"
    assert stats.host_shared_found_bytes == len(kept[busy]) - 64  # that one was found filled, not read
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    assert _arenas(share_dir) == []


_HOLDER = """
import json, sys
sys.path.insert(0, {tests!r})
import vramferry
from pipelines.diffusers_pipes import build_flux, run
_pipe, kwargs = build_flux()
handle = vramferry.load({folder!r}, share_host_store={share!r}, onload_device="cpu", pin_memory=False,
                        mode="layerwise")
handle.pipeline.set_progress_bar_config(disable=True)
image = run(handle.pipeline, kwargs)["images"]
stats = handle.stats()
print(json.dumps({{"found": stats.host_shared_found_bytes, "shared": stats.host_shared_bytes,
                  "sum": float(image.astype("float64").sum())}}), flush=True)
sys.stdin.readline()  # hold the arenas until told to go
"""


def test_two_processes_hold_one_copy(saved_flux_dir, share_dir):
    script = _HOLDER.format(tests=str(HERE), folder=str(saved_flux_dir), share=share_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = []
    try:
        for _ in range(2):  # one after the other: the second finds the first one's arenas
            proc = subprocess.Popen(
                [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
            )
            procs.append(proc)
            line = proc.stdout.readline()
            assert line, f"the process failed (exit code {proc.poll()})"
            procs[-1].result = json.loads(line)
        first, second = (proc.result for proc in procs)
        assert first["found"] == 0 and first["shared"] > 0
        assert second["found"] == second["shared"] == first["shared"]
        assert second["sum"] == first["sum"]
        assert _arenas(share_dir)
    finally:
        for proc in procs:
            proc.communicate("\n", timeout=60)
    assert [proc.returncode for proc in procs] == [0, 0]
    assert _arenas(share_dir) == []


def test_two_processes_loading_at_once_fill_each_arena_once(saved_flux_dir, share_dir):
    script = _HOLDER.format(tests=str(HERE), folder=str(saved_flux_dir), share=share_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]  # both start together: each fills the arenas it gets to first and finds the others filled
    try:
        results = []
        for proc in procs:
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, "a process did not finish loading in 120 s: the two wait for each other"
            line = proc.stdout.readline()
            assert line, f"the process failed (exit code {proc.poll()})"
            results.append(json.loads(line))
        first, second = results
        assert first["shared"] == second["shared"] > 0
        assert first["found"] + second["found"] == first["shared"]  # every arena read once, by one of them
        assert first["sum"] == second["sum"]
    finally:
        for proc in procs:
            proc.communicate("\n", timeout=120)  # neither waits forever for the other
    assert [proc.returncode for proc in procs] == [0, 0]
    assert _arenas(share_dir) == []


def test_weights_built_in_memory_beyond_the_hashed_limit_stay_in_a_private_arena(share_dir):
    from torch import nn

    class Pipe:
        _dit_modules = ["transformer"]
        _encoder_modules: list[str] = []
        _vae_modules: list[str] = []

    pipe = Pipe()
    pipe.transformer = nn.Linear(4096, 4200)  # 69 MB of float32 built in memory: more than is hashed into a name
    weight = pipe.transformer.weight.detach().clone()
    with vramferry.apply(pipe, share_host_store=share_dir, onload_device="cpu", pin_memory=False) as handle:
        assert handle.stats().host_shared_bytes == 0
        assert _arenas(share_dir) == []
        torch.testing.assert_close(pipe.transformer.weight.data, weight, rtol=0, atol=0)


def test_the_setting_takes_a_switch_or_a_folder():
    assert vramferry.OffloadConfig(share_host_store="/dev/shm/x").share_host_store == "/dev/shm/x"
    assert vramferry.OffloadConfig(share_host_store="off").share_host_store is False
    config = vramferry.OffloadConfig(share_host_store=True)
    assert vramferry.OffloadConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="share_host_store"):
        vramferry.OffloadConfig(share_host_store=3)


def test_a_folder_that_cannot_hold_the_arenas_leaves_each_process_its_own_copy(saved_flux_dir, tiny_flux, caplog):
    _pipe, kwargs = tiny_flux
    expected = _expected(saved_flux_dir, tiny_flux)
    with vramferry.load(saved_flux_dir, share_host_store="/nonexistent/shm", **CPU) as handle:
        assert handle.stats().host_shared_bytes == 0
        handle.pipeline.set_progress_bar_config(disable=True)
        got = run(handle.pipeline, kwargs)
    assert "cannot share the host store in /nonexistent/shm" in caplog.text
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
