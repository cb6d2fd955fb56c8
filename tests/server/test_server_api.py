"""The HTTP API in process: valid requests, every kind of bad input, auth, models, health and OpenAPI."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from vramferry.server import ServerSettings, create_app
from vramferry.server.schemas import NOT_BLANK


def _png(item: dict) -> Image.Image:
    data = base64.b64decode(item["b64_json"])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


@pytest.fixture
def client(fake_pipeline):
    settings = ServerSettings(model_name="fake", max_queue=4, timeout=30)
    with TestClient(create_app(fake_pipeline, settings=settings)) as client:
        yield client


def test_demo_pipeline_returns_png_of_the_asked_size(demo_pipeline):
    settings = ServerSettings(model_name="demo", min_size=16)
    with TestClient(create_app(demo_pipeline, settings=settings)) as client:
        r = client.post(
            "/v1/images/generations",
            json={"prompt": "a red cube", "size": "64x32", "num_inference_steps": 1, "seed": 3, "n": 2},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int)
    images = [_png(item) for item in body["data"]]
    assert [image.size for image in images] == [(64, 32), (64, 32)]
    assert images[0].tobytes() != images[1].tobytes()  # seeds 3 and 4


def test_valid_request_defaults_and_distinct_seeds(client, fake_pipeline):
    r = client.post("/v1/images/generations", json={"prompt": "x", "n": 3, "size": "128x64", "seed": 10})
    assert r.status_code == 200, r.text
    images = [_png(item) for item in r.json()["data"]]
    assert [i.size for i in images] == [(128, 64)] * 3
    assert len({i.tobytes() for i in images}) == 3
    assert fake_pipeline.progress_disabled


def test_same_seed_same_image(client):
    body = {"prompt": "x", "size": "64x64", "seed": 5}
    first = client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    second = client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    assert first == second


def test_model_name_and_auto_size_accepted(client):
    r = client.post("/v1/images/generations", json={"prompt": "x", "model": "fake", "size": "auto"})
    assert r.status_code == 200, r.text


BAD = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "\u3000\t\ufeff"}, "prompt"),
    ({"prompt": "x" * 4097}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "x", "negative_prompt": "y" * 4097}, "negative_prompt"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x", "n": "two"}, "n"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "100x100"}, "size"),
    ({"prompt": "x", "size": "4096x4096"}, "size"),
    ({"prompt": "x", "size": "32x32"}, "size"),
    ({"prompt": "x", "size": "64x99999999"}, "size"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 201}, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 21}, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": 2**40}, "seed"),
    ({"prompt": "x", "response_format": "url"}, "response_format"),
    ({"prompt": "x", "model": "dall-e-3"}, "model"),
    ({"prompt": "x", "quality": "hd"}, "quality"),
]


@pytest.mark.parametrize(("body", "param"), BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_input_is_400_naming_the_field(client, fake_pipeline, body, param):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"].startswith(param)
    assert fake_pipeline.calls == 0  # never reached the pipeline


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b'"prompt"'])
def test_malformed_body_is_400(client, fake_pipeline, content):
    r = client.post("/v1/images/generations", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert fake_pipeline.calls == 0


def test_oversized_body_is_413(fake_pipeline):
    settings = ServerSettings(max_body_bytes=1000)
    with TestClient(create_app(fake_pipeline, settings=settings)) as client:
        r = client.post("/v1/images/generations", json={"prompt": "x" * 2000})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"


def test_unknown_route_and_method_in_openai_format(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = client.get("/v1/images/generations")
    assert r.status_code == 405
    assert "error" in r.json()


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["fake"]
    assert models["data"][0]["object"] == "model"
    assert client.get("/health").json() == {"status": "ok"}


def test_api_key(fake_pipeline):
    settings = ServerSettings(model_name="fake", api_key="s3cret")
    with TestClient(create_app(fake_pipeline, settings=settings)) as client:
        assert client.get("/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/openapi.json"):
            r = client.get(path)
            assert r.status_code == 401, path
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        r = client.post("/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 401
        assert fake_pipeline.calls == 0
        ok = {"Authorization": "Bearer s3cret"}
        assert client.get("/v1/models", headers=ok).status_code == 200
        r = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"}, headers=ok)
        assert r.status_code == 200


def test_openapi_documents_the_error_answers(client):
    spec = client.get("/openapi.json").json()
    responses = spec["paths"]["/v1/images/generations"]["post"]["responses"]
    assert {"200", "400", "401", "429", "500", "503", "504"} <= set(responses)
    assert "ErrorResponse" in spec["components"]["schemas"]


@pytest.mark.parametrize(
    "bad",
    [
        {"max_queue": 0},
        {"timeout": 0},
        {"max_size": 32},
        {"max_prompt_chars": 0},
        {"default_size": (4096, 64)},
    ],
)
def test_settings_are_validated(bad):
    with pytest.raises(ValueError):
        ServerSettings(**bad)


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", False), ("n", True), ("n", "2"), ("n", 1.5), ("num_inference_steps", "4"), ("prompt", ["a"])],
)
def test_types_are_strict(client, field, value):
    r = client.post("/v1/images/generations", json={"prompt": "x", field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_request_schema_states_the_limits(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ImageGenerationRequest"]
    props = schema["properties"]
    assert props["prompt"]["maxLength"] == 4096
    assert props["prompt"]["pattern"] == NOT_BLANK  # the very rule the route applies
    assert props["model"]["enum"] == ["fake", None]
    assert "|2048)x(" in props["size"]["pattern"] and "(auto|(64|80|" in props["size"]["pattern"]
    assert schema["additionalProperties"] is False
    assert props["num_inference_steps"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 200}
    assert props["seed"]["anyOf"][0]["minimum"] == 0


def test_integral_floats_are_integers(client):
    r = client.post("/v1/images/generations", json={"prompt": "x", "num_inference_steps": 2.0, "n": 1.0})
    assert r.status_code == 200, r.text


def test_plans_route_lists_the_prepared_shapes_and_which_one_runs(demo_pipeline):
    import vramferry
    from vramferry.planning import Workload

    handle = vramferry.apply(demo_pipeline, vramferry.OffloadConfig(mode="auto", onload_device="cpu"))
    try:
        handle.prepare([Workload(height=64, width=64, steps=2), Workload(height=32, width=48, steps=2)])
        settings = ServerSettings(model_name="demo", min_size=16, api_key="k")
        with TestClient(create_app(demo_pipeline, handle, settings)) as client:
            assert client.get("/v1/plans").status_code == 401
            r = client.get("/v1/plans", headers={"Authorization": "Bearer k"})
        assert r.status_code == 200, r.text
        listed = r.json()["data"]
        assert [(p["size"], p["steps"]) for p in listed][-2:] == [("64x64", 2), ("48x32", 2)]
        assert set(listed[-1]["placement"]) == {c.name for c in handle.plan.components}
        assert any(p["current"] for p in listed)  # the placement in use is one of them
    finally:
        handle.remove()


def test_serve_rejects_a_size_over_the_limit_before_loading():
    from vramferry.cli import main

    assert (
        main(["serve", "--sizes", "512x512,4096x4096", "--max-size", "1024", "--onload-device", "cpu"]) == 2
    )
