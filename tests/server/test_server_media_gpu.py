"""On CUDA: a video job and an image edit served from offloaded pipelines give exactly what the resident pipeline
gives (decoded from the files the server returns), and the status route reports the bytes the offload moved.

Run on a GPU machine: ``python -m pytest -q -m gpu tests/server/test_server_media_gpu.py``.
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import vramferry
from vramferry.server import ServerSettings, create_app

pytestmark = pytest.mark.gpu
av = pytest.importorskip("av", reason="PyAV is in the cli extra")

VIDEO = {"prompt": "dance", "size": "32x16", "num_frames": 9, "num_inference_steps": 2, "seed": 5}


def _video_frames(pipeline, handle) -> tuple[list[np.ndarray], dict]:
    settings = ServerSettings(model_name="wan", min_size=16, call_defaults={"max_sequence_length": 16})
    with TestClient(create_app(pipeline, handle, settings)) as client:
        video_id = client.post("/v1/videos", json=VIDEO).json()["id"]
        deadline = time.monotonic() + 120
        while (job := client.get(f"/v1/videos/{video_id}").json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job["status"] == "completed", job
        content = client.get(f"/v1/videos/{video_id}/content").content
        status = client.get("/v1/status").json()
    with av.open(io.BytesIO(content)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)], status


@pytest.mark.parametrize("mode", ["model", "layerwise", "auto"])
def test_an_offloaded_wan_serves_the_resident_video(mode):
    from media_pipes import build_tiny_wan

    pipe = build_tiny_wan()
    pipe.to("cuda")
    resident, _ = _video_frames(pipe, None)
    pipe.to("cpu")
    handle = vramferry.apply(pipe, vramferry.OffloadConfig(mode=mode, verify=True))
    try:
        offloaded, status = _video_frames(pipe, handle)
    finally:
        handle.remove()
    assert len(offloaded) == len(resident) == 9
    for got, expected in zip(offloaded, resident, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert status["offload_mode"] == mode
    assert status["offload"]["bytes_h2d"] > 0 and status["peak_memory"]["allocated"] > 0


def _edit(pipeline, handle) -> np.ndarray:
    source = io.BytesIO()
    Image.linear_gradient("L").resize((48, 32)).convert("RGB").save(source, format="PNG")
    settings = ServerSettings(model_name="edit", min_size=16, call_defaults={"max_sequence_length": 48})
    with TestClient(create_app(pipeline, handle, settings)) as client:
        r = client.post(
            "/v1/images/edits",
            data={"prompt": "red", "num_inference_steps": "2", "strength": "0.8", "seed": "3"},
            files={"image": ("in.png", source.getvalue(), "image/png")},
        )
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))


@pytest.mark.parametrize("mode", ["model", "layerwise"])
def test_an_offloaded_img2img_serves_the_resident_edit(mode):
    from media_pipes import build_flux_img2img

    pipe = build_flux_img2img()
    pipe.to("cuda")
    resident = _edit(pipe, None)
    pipe.to("cpu")
    handle = vramferry.apply(pipe, vramferry.OffloadConfig(mode=mode, verify=True))
    try:
        offloaded = _edit(pipe, handle)
    finally:
        handle.remove()
    assert offloaded.shape == (32, 48, 3)
    np.testing.assert_array_equal(offloaded, resident)
