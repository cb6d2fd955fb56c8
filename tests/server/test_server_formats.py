"""Output formats: png, jpeg and webp, decodable, of the asked size; output_compression trades size for quality."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from vramferry.server import ServerSettings, create_app


@pytest.fixture
def client(demo_pipeline):
    with TestClient(
        create_app(demo_pipeline, settings=ServerSettings(model_name="demo", min_size=16))
    ) as client:
        yield client


def _generate(client, **fields):
    body = {"prompt": "a red cube", "size": "64x32", "num_inference_steps": 1, "seed": 3, **fields}
    return client.post("/v1/images/generations", json=body)


@pytest.mark.parametrize(("output_format", "pillow"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_each_output_format_decodes_to_the_asked_size(client, output_format, pillow):
    r = _generate(client, output_format=output_format, n=2)
    assert r.status_code == 200, r.text
    assert r.json()["output_format"] == output_format
    images = [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in r.json()["data"]]
    assert [(image.format, image.size) for image in images] == [(pillow, (64, 32))] * 2
    for image in images:
        image.load()  # the whole file decodes, not only its header


def test_the_default_is_png_and_lossless(client):
    png = _generate(client).json()["data"][0]["b64_json"]
    again = _generate(client, output_format="png").json()["data"][0]["b64_json"]
    assert png == again
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_output_compression_sets_the_quality(client, output_format):
    sizes = {}
    for quality in (5, 100):
        r = _generate(client, output_format=output_format, output_compression=quality, size="256x256")
        assert r.status_code == 200, r.text
        sizes[quality] = len(base64.b64decode(r.json()["data"][0]["b64_json"]))
    assert sizes[5] < sizes[100] / 2


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"output_format": "gif"}, "output_format"),
        ({"output_format": "PNG"}, "output_format"),
        ({"output_format": "jpeg", "output_compression": 101}, "output_compression"),
        ({"output_format": "jpeg", "output_compression": -1}, "output_compression"),
        ({"output_format": "jpeg", "output_compression": "50"}, "output_compression"),
        ({"output_compression": 50}, "output_compression"),  # png is lossless: said, not ignored
    ],
)
def test_bad_output_options_are_400_naming_the_field(client, fields, param):
    r = _generate(client, **fields)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
