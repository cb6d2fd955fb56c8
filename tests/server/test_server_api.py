"""The HTTP API in process: valid requests, every kind of bad input, body limits, Host and auth checks, models,
health and OpenAPI."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
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
    ({"prompt": "x", "size": "64x64\n"}, "size"),
    ({"prompt": "x", "size": "\u0666\u0664x\u0668\u0660"}, "size"),  # Arabic-Indic digits: 64x80
    ({"prompt": "x", "size": "\uff16\uff14x64"}, "size"),  # full-width digits
    ({"prompt": "x", "size": " 64x64"}, "size"),
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


@pytest.mark.parametrize(
    "content",
    [
        b'{"prompt": "\xff\xfe"}',  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nested past the parser's recursion limit
        b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}",  # over Python's 4300-digit limit for int()
        b"{not json",
    ],
    ids=["utf8", "nested", "digits", "syntax"],
)
def test_unparsable_body_is_400_invalid_json(client, fake_pipeline, content):
    r = client.post("/v1/images/generations", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"
    assert fake_pipeline.calls == 0


def test_oversized_body_is_413(fake_pipeline):
    settings = ServerSettings(max_body_bytes=1000)
    with TestClient(create_app(fake_pipeline, settings=settings)) as client:
        r = client.post("/v1/images/generations", json={"prompt": "x" * 2000})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "body_too_large"
        # Declared too large: refused on any route, before the body is read.
        r = client.post("/v1/models", content=b"x" * 2000)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_chunked_body_over_the_limit_is_413_as_soon_as_it_passes(fake_pipeline):
    """No Content-Length: the limit is enforced while the stream is read, not after reading 600 MB."""
    app = create_app(fake_pipeline)  # the default limit, 1 MiB
    sent = 0

    async def body():
        nonlocal sent
        chunk = b" " * (1 << 20)
        for _ in range(600):
            sent += 1
            yield chunk

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            try:
                return await client.post(
                    "/v1/images/generations", content=body(), headers={"content-type": "application/json"}
                )
            finally:
                app.state.worker.stop()

    r = asyncio.run(scenario())
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413, r.text[:200]
    assert r.json()["error"] == {
        "message": f"request body: over the limit of {1 << 20} bytes",
        "type": "invalid_request_error",
        "param": None,
        "code": "body_too_large",
    }
    assert sent <= 3  # read up to the limit, not on
    assert fake_pipeline.calls == 0


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


def test_head_health_is_200(client):
    r = client.head("/health")
    assert r.status_code == 200
    assert r.content == b""


def test_every_answer_carries_a_request_id(client):
    ids = {client.get(path).headers["x-request-id"] for path in ("/health", "/v1/models", "/v1/nothing")}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_auth_scheme_is_case_insensitive(fake_pipeline, scheme):
    settings = ServerSettings(model_name="fake", api_key="s3cret")
    with TestClient(create_app(fake_pipeline, settings=settings)) as client:
        assert client.get("/v1/models", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": f"{scheme} s3cre"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401


def _host_status(fake_pipeline, host: str, base_url: str = "http://127.0.0.1:8091", **settings) -> int:
    """The status of ``GET /v1/models`` naming ``host``, received on the address of ``base_url``."""
    app = create_app(fake_pipeline, settings=ServerSettings(**settings))
    with TestClient(app, base_url=base_url) as client:
        r = client.get("/v1/models", headers={"Host": host})
    if r.status_code == 400:
        assert r.json()["error"]["code"] == "invalid_host"
        assert "allowed_hosts" in r.json()["error"]["message"]
    return r.status_code


@pytest.mark.parametrize("host", ["localhost", "localhost:8091", "127.0.0.1:8091", "[::1]:8091", "LocalHost"])
def test_loopback_names_are_served_on_loopback(fake_pipeline, host):
    assert _host_status(fake_pipeline, host) == 200


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8091", "127.0.0.1.nip.io", "localhost.evil.example", "", "a b", "[::1"],
)
def test_other_hosts_are_refused_on_loopback(fake_pipeline, host):
    """DNS rebinding: a page from evil.example that resolves its name to 127.0.0.1 must not reach the server."""
    assert _host_status(fake_pipeline, host) == 400
    assert _host_status(fake_pipeline, host, base_url="http://[::1]:8091") == 400


def test_allowed_hosts_setting(fake_pipeline):
    allowed = {"allowed_hosts": ["images.example.com", "*.internal.example"]}
    assert _host_status(fake_pipeline, "images.example.com:443", **allowed) == 200
    assert _host_status(fake_pipeline, "gpu1.internal.example", **allowed) == 200
    assert _host_status(fake_pipeline, "internal.example", **allowed) == 400
    assert _host_status(fake_pipeline, "localhost", **allowed) == 400  # the list replaces the default
    assert _host_status(fake_pipeline, "evil.example", allowed_hosts=["*"]) == 200
    # Received on a network address with no list: not checked (set allowed_hosts when serving on a network).
    assert _host_status(fake_pipeline, "evil.example", base_url="http://192.0.2.7:8091") == 200
    assert _host_status(fake_pipeline, "evil.example", base_url="http://192.0.2.7", **allowed) == 400


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
        {"allowed_hosts": "localhost"},
        {"allowed_hosts": []},
        {"allowed_hosts": ["localhost", ""]},
        {"header_timeout": 0},
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
