"""Image edits: a tiny img2img Flux returns an image of the asked size; every bad upload is a 400 naming its field."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from server_fakes import FakeEditPipeline, FakePipeline

from vramferry.server import ServerSettings, create_app


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def photo(width: int = 48, height: int = 32) -> bytes:
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    return encoded(image)


def decoded(item: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


@pytest.fixture(scope="module")
def flux_img2img():
    from media_pipes import build_flux_img2img

    return build_flux_img2img()


def test_a_tiny_img2img_flux_returns_images_of_the_asked_size(flux_img2img):
    settings = ServerSettings(model_name="edit", min_size=16, call_defaults={"max_sequence_length": 48})
    with TestClient(create_app(flux_img2img, settings=settings)) as client:
        fields = {
            "prompt": "make it red",
            "size": "32x48",
            "n": "2",
            "num_inference_steps": "2",
            "strength": "0.8",
            "seed": "4",
            "output_format": "webp",
        }
        r = client.post("/v1/images/edits", data=fields, files={"image": ("in.png", photo(), "image/png")})
        assert r.status_code == 200, r.text
        images = [decoded(item) for item in r.json()["data"]]
        assert [(image.format, image.size) for image in images] == [("WEBP", (32, 48))] * 2
        assert images[0].tobytes() != images[1].tobytes()  # seeds 4 and 5
        # Without a size, the input's own size.
        r = client.post(
            "/v1/images/edits",
            data={"prompt": "x", "num_inference_steps": "1", "strength": "0.5"},
            files={"image": ("in.png", photo(48, 32), "image/png")},
        )
        assert r.status_code == 200, r.text
        assert decoded(r.json()["data"][0]).size == (48, 32)


def test_the_pipeline_gets_the_image_and_the_mask():
    pipeline = FakeEditPipeline(inpaint=True)
    mask = encoded(Image.new("L", (48, 32), 255))
    with TestClient(create_app(pipeline, settings=ServerSettings(min_size=16))) as client:
        files = {
            "image[]": ("in.jpg", encoded(Image.new("RGB", (48, 32), (0, 0, 255)), "JPEG"), "image/jpeg"),
            "mask": ("mask.png", mask, "image/png"),
        }
        r = client.post("/v1/images/edits", data={"prompt": "x", "strength": "0.25"}, files=files)
    assert r.status_code == 200, r.text
    received = pipeline.received[0]
    assert received["image"].size == (48, 32) and received["image"].getpixel((0, 0))[2] > 200
    assert received["mask_image"].size == (48, 32)
    assert received["strength"] == 0.25


def _huge_png() -> bytes:
    """A small file that declares a 5000x5000 image (a decompression bomb in miniature)."""
    return encoded(Image.new("1", (5000, 5000)))


def _truncated() -> bytes:
    whole = photo()
    return whole[: len(whole) // 2]


BAD_UPLOADS = [
    ({}, "image", "is required"),
    ({"image": ("a.png", b"", "image/png")}, "image", "empty"),
    ({"image": ("a.txt", b"hello, world", "text/plain")}, "image", "not a PNG, JPEG or WebP"),
    ({"image": ("a.gif", encoded(Image.new("RGB", (32, 32)), "GIF"), "image/gif")}, "image", "not a PNG"),
    ({"image": ("a.bmp", encoded(Image.new("RGB", (32, 32)), "BMP"), "image/bmp")}, "image", "not a PNG"),
    ({"image": ("a.png", _truncated(), "image/png")}, "image", "truncated or corrupt"),
    ({"image": ("a.png", _huge_png(), "image/png")}, "image", "over the limit"),
    ({"image": (None, "not a file")}, "image", "must be a file"),
    (
        {"image": ("a.png", photo(), "image/png"), "image[]": ("b.png", photo(), "image/png")},
        "image",
        "more than once",
    ),
    (
        {"image": ("a.png", photo(), "image/png"), "prompt": ("p.txt", b"x", "text/plain")},
        "prompt",
        "a file was sent",
    ),
    ({"image": ("a.png", photo(50, 50), "image/png")}, "size", "give a size, e.g. '48x48'"),
    (
        {"image": ("a.png", photo(), "image/png"), "mask": ("m.png", photo(), "image/png")},
        "mask",
        "takes no mask",
    ),
]


@pytest.mark.parametrize(("files", "param", "message"), BAD_UPLOADS)
def test_each_bad_upload_is_400(files, param, message):
    pipeline = FakeEditPipeline()
    settings = ServerSettings(min_size=16, max_upload_pixels=1_000_000)
    with TestClient(create_app(pipeline, settings=settings)) as client:
        fields = {"prompt": (None, "x")} if "prompt" not in files else {}
        r = client.post("/v1/images/edits", files={**fields, **files})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert pipeline.calls == 0


BAD_FIELDS = [
    ({"n": "two"}, "n"),
    ({"n": "11"}, "n"),
    ({"strength": "0"}, "strength"),
    ({"strength": "1.5"}, "strength"),
    ({"size": "33x33"}, "size"),
    ({"output_format": "gif"}, "output_format"),
    ({"lora": "{not json"}, "lora"),
    ({"lora": '{"style": 1}'}, "lora.style"),
    ({"background": "transparent"}, "background"),
    ({"prompt": ""}, "prompt"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_FIELDS)
def test_bad_fields_of_an_edit_are_400(fields, param):
    pipeline = FakeEditPipeline()
    with TestClient(create_app(pipeline, settings=ServerSettings(min_size=16))) as client:
        r = client.post(
            "/v1/images/edits",
            data={"prompt": "x", **fields},
            files={"image": ("a.png", photo(), "image/png")},
        )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert pipeline.calls == 0


def test_the_upload_limits_and_the_content_type():
    settings = ServerSettings(min_size=16, max_upload_bytes=4000)
    with TestClient(create_app(FakeEditPipeline(), settings=settings)) as client:
        big = photo(1024, 1024) + b"\0" * 5000
        r = client.post(
            "/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", big, "image/png")}
        )
        assert r.status_code == 413 and "4000" in r.json()["error"]["message"]
        r = client.post("/v1/images/edits", content=b"prompt=x", headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
        r = client.post("/v1/images/edits", json={"prompt": "x"})  # JSON cannot carry the image
        assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_a_pipeline_without_an_input_image_serves_no_edits():
    with TestClient(create_app(FakePipeline())) as client:
        r = client.post(
            "/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", photo(), "image/png")}
        )
        assert r.status_code == 404 and "takes no input image" in r.json()["error"]["message"]
        assert "/v1/images/edits" not in client.get("/openapi.json").json()["paths"]


def test_an_offloaded_pipeline_checked_by_verify_still_serves_edits(flux_img2img):
    """``verify=True`` swaps in a class of its own: its ``__call__`` keeps the signature the server reads."""
    import vramferry

    handle = vramferry.apply(
        flux_img2img, vramferry.OffloadConfig(mode="model", onload_device="cpu", verify=True)
    )
    try:
        settings = ServerSettings(model_name="edit", min_size=16, call_defaults={"max_sequence_length": 48})
        with TestClient(create_app(flux_img2img, handle, settings)) as client:
            r = client.post(
                "/v1/images/edits",
                data={"prompt": "x", "size": "32x32", "num_inference_steps": "1", "strength": "0.5"},
                files={"image": ("in.png", photo(), "image/png")},
            )
            status = client.get("/v1/status").json()
    finally:
        handle.remove()
    assert r.status_code == 200, r.text
    assert decoded(r.json()["data"][0]).size == (32, 32)
    assert status["offload_mode"] == "model" and status["offload"]["bytes_h2d"] > 0
