"""The official ``openai`` client against the server, served by uvicorn in this process: images.generate,
images.edit, and videos.create / retrieve / download_content / delete."""

from __future__ import annotations

import base64
import io
import time
import warnings

import pytest
from live import live_server
from PIL import Image

from vramferry.server import ServerSettings, create_app

openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
av = pytest.importorskip("av", reason="PyAV is in the cli extra")

KEY = "test-key"


def client_for(host: str, port: int):
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_images_generate(demo_pipeline):
    settings = ServerSettings(model_name="demo", api_key=KEY, min_size=16)
    with live_server(create_app(demo_pipeline, settings=settings), settings) as (host, port):
        client = client_for(host, port)
        assert [model.id for model in client.models.list()] == ["demo"]
        result = client.images.generate(
            model="demo",
            prompt="a red cube",
            size="64x32",
            n=2,
            response_format="b64_json",
            output_format="jpeg",
            output_compression=80,
            extra_body={"num_inference_steps": 1, "seed": 3},
        )
        with pytest.raises(openai.BadRequestError, match="not 'dall-e-3'"):
            client.images.generate(model="dall-e-3", prompt="x")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="wrong", max_retries=0).models.list()
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]
    assert [(image.format, image.size) for image in images] == [("JPEG", (64, 32))] * 2


def test_images_edit():
    from media_pipes import build_flux_img2img

    settings = ServerSettings(
        model_name="edit", api_key=KEY, min_size=16, call_defaults={"max_sequence_length": 48}
    )
    source = io.BytesIO()
    Image.linear_gradient("L").resize((48, 32)).convert("RGB").save(source, format="PNG")
    with live_server(create_app(build_flux_img2img(), settings=settings), settings) as (host, port):
        result = client_for(host, port).images.edit(
            model="edit",
            image=("in.png", source.getvalue(), "image/png"),
            prompt="make it red",
            size="32x32",
            n=1,
            extra_body={"num_inference_steps": 2, "strength": 0.7, "seed": 1},
        )
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert (image.format, image.size) == ("PNG", (32, 32))


def test_videos_create_retrieve_download_and_delete():
    from media_pipes import build_tiny_wan

    settings = ServerSettings(
        model_name="wan", api_key=KEY, min_size=16, call_defaults={"max_sequence_length": 16}
    )
    with live_server(create_app(build_tiny_wan(), settings=settings), settings) as (host, port):
        client = client_for(host, port)
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", DeprecationWarning
            )  # the client marks its video methods deprecated
            video = client.videos.create(
                model="wan",
                prompt="dance",
                size="32x16",
                seconds="1",
                extra_body={"fps": 8, "num_inference_steps": 2, "seed": 2},
            )
            assert video.status in ("queued", "in_progress") and video.num_frames == 9
            deadline = time.monotonic() + 60
            while video.status in ("queued", "in_progress"):
                assert time.monotonic() < deadline, "the video job did not finish"
                time.sleep(0.05)
                video = client.videos.retrieve(video.id)
            assert (video.status, video.progress, video.size, video.seconds) == (
                "completed",
                100,
                "32x16",
                "1.125",
            )
            content = client.videos.download_content(video.id).read()
            deleted = client.videos.delete(video.id)
            assert deleted.deleted and deleted.id == video.id
            with pytest.raises(openai.NotFoundError):
                client.videos.retrieve(video.id)
    with av.open(io.BytesIO(content)) as container:
        frames = [frame.to_image() for frame in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].size == (32, 16)
