"""On a CUDA device: a saved pipeline loaded straight into the pinned host store gives the resident output."""

from __future__ import annotations

import numpy as np
import pytest

import vramferry
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, run

pytestmark = pytest.mark.gpu
diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("name", ["flux", "wan", "ltx2"])
@pytest.mark.parametrize("mode", ["model", "layerwise", "auto"])
def test_load_gives_the_resident_output(name, mode, tmp_path):
    pipe, kwargs = DIFFUSERS_PIPELINES[name]()
    pipe.save_pretrained(tmp_path)
    resident = diffusers.DiffusionPipeline.from_pretrained(tmp_path).to("cuda")
    resident.set_progress_bar_config(disable=True)
    expected = run(resident, kwargs)
    del resident
    with vramferry.load(tmp_path, vramferry.OffloadConfig(mode=mode, verify=True)) as handle:
        handle.pipeline.set_progress_bar_config(disable=True)
        stats = handle.stats()
        # Read from the files straight into page-locked arenas.
        assert stats.host_file_bytes > 0 and stats.host_pinned_bytes >= stats.host_file_bytes
        # Resident pieces start copying to the GPU while the next component's arena fills.
        resident = sum(u.nbytes for u in handle.units() if u.kind == "resident")
        assert stats.loaded_while_filling_bytes == resident
        if mode == "auto":  # a tiny pipeline: all of it resident
            assert resident > 0
        got = run(handle.pipeline, kwargs)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def _copied_bytes(folder: str) -> int:
    """Bytes of private copies made of pages of ``folder``'s files mapped into this process: a page copied on
    write (or on page-locking for writing) becomes anonymous memory inside the file's mapping. (``Private_Dirty``
    would also count file pages that only one of the mappings maps.)"""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                inside = folder in line
            elif inside and line.startswith("Anonymous:"):
                total += int(line.split()[1]) * 1024
    return total


def test_two_pipelines_share_one_page_locked_host_copy(tmp_path):
    import os
    import tempfile

    if not os.path.isdir("/dev/shm"):
        pytest.skip("needs /dev/shm")
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    pipe.save_pretrained(tmp_path)
    resident = diffusers.DiffusionPipeline.from_pretrained(tmp_path).to("cuda")
    resident.set_progress_bar_config(disable=True)
    expected = run(resident, kwargs)
    del resident
    share = tempfile.mkdtemp(prefix="vramferry-gpu-test-", dir="/dev/shm")
    config = vramferry.OffloadConfig(mode="layerwise", share_host_store=share)
    try:
        with vramferry.load(tmp_path, config) as first, vramferry.load(tmp_path, config) as second:
            one, two = first.stats(), second.stats()
            assert two.host_shared_found_bytes == one.host_shared_bytes > 0, (one, two)
            # Page-locked read-only in both: no page was copied for either process.
            assert two.host_pinned_bytes >= two.host_shared_bytes, "the shared arenas were not page-locked"
            copied = _copied_bytes(share)
            assert copied < 2**20, f"page-locking copied {copied} bytes of the shared arenas"
            for handle in (first, second):
                handle.pipeline.set_progress_bar_config(disable=True)
                got = run(handle.pipeline, kwargs)
                for key in expected:
                    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
        assert os.listdir(share) == [], "the last handle let go but the shared arenas are still there"
    finally:
        for name in os.listdir(share):
            os.unlink(os.path.join(share, name))
        os.rmdir(share)


def test_a_fill_that_fails_leaves_every_weight_on_the_host(monkeypatch):
    """Resident pieces start copying to the GPU while later arenas fill: if a later one fails, those copies are
    dropped again, and no weight is left bound to device memory."""
    from vramferry.runtime.store import HostStore

    pipe, _kwargs = DIFFUSERS_PIPELINES["flux"]()
    packed = HostStore.pack
    seen: list[str] = []

    def pack(self, name, *args, **kwargs):
        seen.append(name)
        if len(seen) == 3:
            raise OSError("the disk went away")
        return packed(self, name, *args, **kwargs)

    monkeypatch.setattr(HostStore, "pack", pack)
    with pytest.raises(OSError, match="the disk went away"):
        vramferry.apply(pipe, vramferry.OffloadConfig(mode="auto"))
    for component in pipe.components.values():
        if hasattr(component, "parameters"):
            assert all(p.device.type == "cpu" for p in component.parameters())


def test_the_kernel_warm_up_leaves_the_output_as_without_it():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    found = {}
    for warm_up in (False, True):
        with vramferry.apply(pipe, vramferry.OffloadConfig(mode="layerwise", warm_up=warm_up)) as handle:
            pipe.set_progress_bar_config(disable=True)
            steps = handle.stats().apply_seconds
            assert ("kernel warm-up, beside the rest" in steps) == warm_up, steps
            found[warm_up] = run(pipe, kwargs)
    for key in found[False]:
        np.testing.assert_array_equal(found[True][key], found[False][key], err_msg=key)


def test_the_kernel_warm_up_frees_its_scratch_memory():
    import torch

    from vramferry.runtime.warmup import Op, Warmup

    device = torch.device("cuda")
    big = Op("linear", (16384, 8192, 8192, True), torch.bfloat16)  # 640 MiB of scratch
    conv = Op("conv", (2, 512, 512, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, (128, 128)), torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    warmup = Warmup([big, conv], device, limit=2**40).start()
    warmup.join()
    assert warmup.error is None and warmup.ran == [big, conv]
    kept = torch.cuda.memory_allocated(device) - before
    # What may stay is cuBLAS's workspace for the stream, which the first request then uses.
    assert kept < 128 * 2**20, f"{kept} bytes still allocated after the warm-up"
