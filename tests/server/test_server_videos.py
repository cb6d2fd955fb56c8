"""Video jobs: from submit to a decoded MP4, progress, cancellation, the shared queue, the bounded spool, and every
bad request answered 400 naming its field."""

from __future__ import annotations

import io
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from server_fakes import FakePipeline, FakeVideoPipeline

from vramferry.server import ServerSettings, create_app

av = pytest.importorskip("av", reason="PyAV is in the cli extra")


def decode(data: bytes) -> tuple[str, list]:
    """The container's format name and every decoded frame."""
    with av.open(io.BytesIO(data)) as container:
        return container.format.name, [frame.to_image() for frame in container.decode(video=0)]


def wait_for(client, video_id: str, statuses=("completed", "failed"), timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/videos/{video_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"video {video_id} still {job['status']}")
        time.sleep(0.02)


def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def wan():
    from media_pipes import build_tiny_wan

    return build_tiny_wan()


def settings(**changes) -> ServerSettings:
    return ServerSettings(**{"model_name": "video", "min_size": 16, "timeout": 30, **changes})


def test_a_wan_job_makes_an_mp4_of_the_asked_frames_and_size(wan):
    app = create_app(wan, settings=settings(call_defaults={"max_sequence_length": 16}))
    with TestClient(app) as client:
        r = client.post(
            "/v1/videos",
            json={"prompt": "dance", "size": "32x16", "num_frames": 9, "num_inference_steps": 2, "seed": 1},
        )
        assert r.status_code == 200, r.text
        created = r.json()
        assert created["object"] == "video" and created["status"] in ("queued", "in_progress")
        assert created["id"].startswith("video_")
        job = wait_for(client, created["id"])
        assert job["status"] == "completed", job
        assert (job["progress"], job["steps_done"], job["steps_total"]) == (100, 2, 2)
        assert (job["num_frames"], job["size"], job["seconds"]) == (9, "32x16", "0.5625")
        assert job["expires_at"] >= job["completed_at"] >= job["created_at"]
        content = client.get(f"/v1/videos/{created['id']}/content")
        assert content.status_code == 200
        assert content.headers["content-type"] == "video/mp4"
        container, frames = decode(content.content)
    assert "mp4" in container
    assert len(frames) == 9 and {frame.size for frame in frames} == {(32, 16)}
    assert len({frame.tobytes() for frame in frames}) > 1  # a moving picture, not one frame repeated


@pytest.mark.parametrize(
    ("output_format", "media_type", "container"),
    [("webm", "video/webm", "webm"), ("gif", "image/gif", "gif")],
)
def test_webm_and_gif(output_format, media_type, container):
    with TestClient(create_app(FakeVideoPipeline(), settings=settings())) as client:
        body = {"prompt": "x", "size": "48x32", "num_frames": 5, "output_format": output_format}
        video_id = client.post("/v1/videos", json=body).json()["id"]
        assert wait_for(client, video_id)["status"] == "completed"
        content = client.get(f"/v1/videos/{video_id}/content")
    assert content.headers["content-type"] == media_type
    name, frames = decode(content.content)
    assert container in name
    assert len(frames) == 5 and frames[0].size == (48, 32)


def test_seconds_become_frames_at_the_pipelines_granularity():
    with TestClient(create_app(FakeVideoPipeline(), settings=settings())) as client:
        r = client.post("/v1/videos", json={"prompt": "x", "seconds": "1", "fps": 8, "size": "32x32"})
        assert r.status_code == 200, r.text
        assert r.json()["num_frames"] == 9  # 8 frames, to the nearest 4k+1
        job = wait_for(client, r.json()["id"])
        _, frames = decode(client.get(f"/v1/videos/{job['id']}/content").content)
        metrics = client.get("/metrics").text
    assert "vramferry_videos_generated_total 1.0" in metrics
    assert "vramferry_images_generated_total 0.0" in metrics
    assert len(frames) == 9
    assert job["fps"] == 8 and job["seconds"] == "1.125"


def test_progress_advances_step_by_step():
    steps = threading.Semaphore(0)
    pipeline = FakeVideoPipeline(steps)
    with TestClient(create_app(pipeline, settings=settings())) as client:
        video_id = client.post(
            "/v1/videos", json={"prompt": "x", "num_frames": 5, "num_inference_steps": 4}
        ).json()["id"]
        assert pipeline.entered.wait(5)
        seen = [client.get(f"/v1/videos/{video_id}").json()]
        for done in (1, 2, 3):
            steps.release()
            until(lambda done=done: client.get(f"/v1/videos/{video_id}").json()["steps_done"] == done)
            seen.append(client.get(f"/v1/videos/{video_id}").json())
        steps.release()
        seen.append(wait_for(client, video_id))
    assert [job["status"] for job in seen] == ["in_progress"] * 4 + ["completed"]
    assert [job["progress"] for job in seen] == [0, 25, 50, 75, 100]


def test_delete_cancels_a_running_job_and_frees_the_worker():
    steps = threading.Semaphore(0)  # never released: only the cancellation can end the job
    pipeline = FakeVideoPipeline(steps)
    app = create_app(pipeline, settings=settings())
    with TestClient(app) as client:
        video_id = client.post("/v1/videos", json={"prompt": "x", "num_frames": 5}).json()["id"]
        queued_id = client.post("/v1/videos", json={"prompt": "y", "num_frames": 5}).json()["id"]
        assert pipeline.entered.wait(5)
        assert client.get(f"/v1/videos/{queued_id}").json()["status"] == "queued"
        r = client.delete(f"/v1/videos/{queued_id}")  # leaves the queue at once
        assert r.json() == {"id": queued_id, "object": "video.deleted", "deleted": True}
        assert app.state.worker.waiting == 0
        assert client.delete(f"/v1/videos/{video_id}").status_code == 200
        until(lambda: app.state.worker.idle)
        assert client.get(f"/v1/videos/{video_id}").status_code == 404
        assert client.get(f"/v1/videos/{video_id}/content").status_code == 404
        assert client.delete(f"/v1/videos/{video_id}").status_code == 404
        assert pipeline.calls == 1 and pipeline.finished == 0
        pipeline.steps = None  # the next job runs through
        image = client.post("/v1/images/generations", json={"prompt": "x", "num_inference_steps": 1})
        assert image.status_code == 200  # a video pipeline also answers image requests (their first frame)
        assert client.get("/v1/videos").json()["data"] == []


def test_videos_and_images_share_the_one_queue():
    steps = threading.Semaphore(0)
    pipeline = FakeVideoPipeline(steps)
    with TestClient(create_app(pipeline, settings=settings(max_queue=1))) as client:
        running = client.post(
            "/v1/videos", json={"prompt": "x", "num_frames": 5, "num_inference_steps": 1}
        ).json()
        assert pipeline.entered.wait(5)
        waiting = client.post(
            "/v1/videos", json={"prompt": "y", "num_frames": 5, "num_inference_steps": 1}
        ).json()
        full = client.post("/v1/images/generations", json={"prompt": "z"})
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        refused = client.post("/v1/videos", json={"prompt": "w", "num_frames": 5})
        assert refused.status_code == 429
        listed = [job["id"] for job in client.get("/v1/videos").json()["data"]]
        assert listed == [waiting["id"], running["id"]]  # newest first; the refused one is not kept
        steps.release(2)
        assert wait_for(client, running["id"])["status"] == "completed"
        assert wait_for(client, waiting["id"])["status"] == "completed"


def test_content_before_completion_is_409_and_other_variants_400():
    steps = threading.Semaphore(0)
    with TestClient(create_app(FakeVideoPipeline(steps), settings=settings())) as client:
        video_id = client.post(
            "/v1/videos", json={"prompt": "x", "num_frames": 5, "num_inference_steps": 1}
        ).json()["id"]
        r = client.get(f"/v1/videos/{video_id}/content")
        assert r.status_code == 409 and r.json()["error"]["code"] == "video_not_ready"
        steps.release()
        wait_for(client, video_id)
        r = client.get(f"/v1/videos/{video_id}/content", params={"variant": "thumbnail"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "variant"
        assert client.get("/v1/videos/video_nope").status_code == 404


def _files(folder) -> list:
    return sorted(path for path in folder.iterdir() if path.is_file())


def test_the_spool_keeps_within_its_bytes_deleting_the_oldest(tmp_path):
    pipeline = FakeVideoPipeline()
    # One 5-frame 32x32 MP4 of these solid colours is about 1-2 KB: room for one, not for two.
    with TestClient(create_app(pipeline, settings=settings())) as probe:
        one = probe.post("/v1/videos", json={"prompt": "x", "num_frames": 5, "seed": 0}).json()["id"]
        wait_for(probe, one)
        size = len(probe.get(f"/v1/videos/{one}/content").content)
    spool = tmp_path / "spool"
    app = create_app(pipeline, settings=settings(spool_dir=spool, spool_max_bytes=int(size * 1.5)))
    with TestClient(app) as client:
        ids = []
        for seed in range(3):
            ids.append(
                client.post("/v1/videos", json={"prompt": "x", "num_frames": 5, "seed": seed}).json()["id"]
            )
            wait_for(client, ids[-1])
            assert sum(path.stat().st_size for path in _files(spool)) <= size * 1.5
        assert [client.get(f"/v1/videos/{video_id}").status_code for video_id in ids] == [404, 404, 200]
        assert [path.name for path in _files(spool)] == [f"{ids[-1]}.mp4"]
    assert _files(spool) == []  # stopping the server deletes its videos


def test_finished_jobs_expire_after_the_retention_time():
    app = create_app(FakeVideoPipeline(), settings=settings(video_retention=0.3))
    with TestClient(app) as client:
        video_id = client.post("/v1/videos", json={"prompt": "x", "num_frames": 5}).json()["id"]
        job = wait_for(client, video_id)
        spool = app.state.videos.spool
        assert [path.name for path in _files(spool)] == [f"{video_id}.mp4"]
        time.sleep(max(0.0, job["expires_at"] - time.time()) + 0.05)
        assert client.get(f"/v1/videos/{video_id}").status_code == 404
        assert _files(spool) == []
    assert not spool.exists()  # a temporary spool goes with the server


def test_unfinished_jobs_are_bounded():
    steps = threading.Semaphore(0)
    with TestClient(create_app(FakeVideoPipeline(steps), settings=settings(max_video_jobs=2))) as client:
        for prompt in ("a", "b"):
            assert (
                client.post(
                    "/v1/videos", json={"prompt": prompt, "num_frames": 5, "num_inference_steps": 1}
                ).status_code
                == 200
            )
        r = client.post("/v1/videos", json={"prompt": "c", "num_frames": 5})
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_jobs"
        steps.release(2)
        for job in client.get("/v1/videos").json()["data"]:
            wait_for(client, job["id"])
        # Finished jobs make room: the oldest goes.
        assert (
            client.post(
                "/v1/videos", json={"prompt": "c", "num_frames": 5, "num_inference_steps": 1}
            ).status_code
            == 200
        )
        steps.release()
        assert [job["prompt"] for job in client.get("/v1/videos").json()["data"]] == ["c", "b"]


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _form(**fields) -> dict:
    """Text fields of a multipart body, as the openai client sends them (no file: httpx sends files=)."""
    return {name: (None, str(value)) for name, value in fields.items()}


def test_a_multipart_request_as_the_openai_client_sends_it():
    with TestClient(create_app(FakeVideoPipeline(), settings=settings())) as client:
        fields = _form(prompt="x", size="32x16", num_frames=5, num_inference_steps=1, lora="{}")
        r = client.post("/v1/videos", files=fields)
        assert r.status_code == 200, r.text
        job = wait_for(client, r.json()["id"])
    assert (job["num_frames"], job["size"], job["status"]) == (5, "32x16", "completed")


def test_an_image_to_video_pipeline_gets_the_input_reference():
    pipeline = FakeVideoPipeline(takes_image=True)
    with TestClient(create_app(pipeline, settings=settings())) as client:
        files = {
            **_form(prompt="x", num_frames=5),
            "input_reference": ("first.png", _png(48, 32), "image/png"),
        }
        r = client.post("/v1/videos", files=files)
        assert r.status_code == 200, r.text
        wait_for(client, r.json()["id"])
        bad = client.post(
            "/v1/videos", files={**_form(prompt="x"), "input_reference": ("a.png", b"GIF89a", "image/gif")}
        )
    assert pipeline.images[0].size == (48, 32)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input_reference"


BAD = [
    ({"seconds": "2", "num_frames": 9}, "seconds"),
    ({"num_frames": 10}, "num_frames"),  # Wan makes 4k+1 frames: "try 9 or 13"
    ({"num_frames": 0}, "num_frames"),
    ({"num_frames": 261}, "num_frames"),  # over max_frames
    ({"seconds": "soon"}, "seconds"),
    ({"seconds": "-1"}, "seconds"),
    ({"seconds": "nan"}, "seconds"),
    ({"fps": 0}, "fps"),
    ({"size": "30x30"}, "size"),
    ({"size": "4096x16"}, "size"),
    ({"output_format": "avi"}, "output_format"),
    ({"model": "other"}, "model"),
    ({"quality": "high"}, "quality"),
    ({"num_inference_steps": "two"}, "num_inference_steps"),
    ({"prompt": "   "}, "prompt"),
]


@pytest.mark.parametrize(("fields", "param"), BAD)
def test_bad_video_requests_are_400_naming_the_field(fields, param):
    pipeline = FakeVideoPipeline()
    with TestClient(create_app(pipeline, settings=settings(max_frames=257))) as client:
        r = client.post("/v1/videos", json={"prompt": "x", **fields})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        if fields == {"num_frames": 10}:
            assert "try 9 or 13" in r.json()["error"]["message"]
        assert client.get("/v1/videos").json()["data"] == []
    assert pipeline.calls == 0


def test_input_reference_on_a_text_to_video_pipeline_is_400():
    with TestClient(create_app(FakeVideoPipeline(), settings=settings())) as client:
        files = {**_form(prompt="x"), "input_reference": ("a.png", _png(32, 32), "image/png")}
        r = client.post("/v1/videos", files=files)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference"


def test_an_image_server_says_it_makes_no_videos():
    with TestClient(create_app(FakePipeline())) as client:
        r = client.post("/v1/videos", json={"prompt": "x"})
        assert r.status_code == 404
        assert "makes images, not videos" in r.json()["error"]["message"]
        assert "/v1/videos" not in client.get("/openapi.json").json()["paths"]
