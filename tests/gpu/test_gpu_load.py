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
        got = run(handle.pipeline, kwargs)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
