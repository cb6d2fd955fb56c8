"""LoRA adapters in the server: loaded before offload, switched per request by the worker, and the same images
as the pipeline without offload carrying the same adapter weights."""

from __future__ import annotations

import base64

import pytest
import torch
from fastapi.testclient import TestClient

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

import vramferry  # noqa: E402
from vramferry.server import ServerSettings, create_app  # noqa: E402
from vramferry.server.generation import GenerationParams, generate, png_bytes  # noqa: E402
from vramferry.server.lora import LoraError, load_lora_adapters  # noqa: E402

URL = "/v1/images/generations"
BASE = {"prompt": "a red cube", "size": "32x32", "num_inference_steps": 1, "seed": 3}


def _save_adapter(folder, seed: int) -> None:
    """A random LoRA for the tiny Flux transformer, saved the way diffusers saves trained ones."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    from pipelines.diffusers_pipes import build_flux

    pipe, _ = build_flux()
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False
    )
    pipe.transformer.add_adapter(config, adapter_name="x")
    layers = get_peft_model_state_dict(pipe.transformer, adapter_name="x")
    diffusers.FluxPipeline.save_lora_weights(folder, transformer_lora_layers=layers)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    dirs = {"a": tmp_path_factory.mktemp("lora_a"), "b": tmp_path_factory.mktemp("lora_b")}
    for seed, folder in enumerate(dirs.values(), start=1):
        _save_adapter(folder, seed)
    return dirs


def _flux_with(adapter_dirs) -> object:
    from pipelines.diffusers_pipes import build_flux

    pipe, _ = build_flux()  # the same random weights every time (seeded)
    names = load_lora_adapters(pipe, list(adapter_dirs.items()))
    assert names == ("a", "b")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(adapter_dirs):
    """The pipeline without offload: ``reference(weights)`` is the PNG of BASE with those adapter weights."""
    pipe = _flux_with(adapter_dirs)

    def run(weights: dict[str, float]) -> bytes:
        if weights:
            pipe.enable_lora()
            pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
        else:
            pipe.disable_lora()
        params = GenerationParams(
            prompt=BASE["prompt"], steps=1, width=32, height=32, seed=BASE["seed"],
            extra={"max_sequence_length": 48},
        )  # fmt: skip
        return png_bytes(generate(pipe, params)[0])

    return run


@pytest.fixture(scope="module")
def served(adapter_dirs):
    """``(client, app)``: the server on the pipeline with adapters loaded, then offloaded (model mode, CPU)."""
    pipe = _flux_with(adapter_dirs)
    handle = vramferry.apply(pipe, vramferry.OffloadConfig(mode="model", onload_device="cpu"))
    settings = ServerSettings(model_name="flux", min_size=16, call_defaults={"max_sequence_length": 48})
    app = create_app(pipe, handle, settings)
    with TestClient(app) as client:
        yield client, app
    handle.remove()


def _image(response) -> bytes:
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["data"][0]["b64_json"])


def test_requests_switch_adapters_and_match_the_pipeline_without_offload(served, reference):
    client, app = served
    cases = [
        (None, {"a": 1.0, "b": 1.0}),  # no lora: every loaded adapter at 1.0
        ({"a": 0.5}, {"a": 0.5}),
        ({"a": -1.5, "b": 2}, {"a": -1.5, "b": 2.0}),  # an integer weight counts as the number
        ({}, {}),  # LoRA off
        ({"b": 1.0}, {"b": 1.0}),  # on again after {}
    ]
    images = []
    for lora, weights in cases:
        body = BASE if lora is None else {**BASE, "lora": lora}
        image = _image(client.post(URL, json=body))
        assert image == reference(weights), lora
        images.append(image)
    assert len(set(images)) == len(cases)  # each set of weights changes the image


def test_same_weights_do_not_switch_again(served):
    client, app = served
    lora = app.state.worker.lora
    _image(client.post(URL, json={**BASE, "lora": {"a": 0.25}}))
    switches = lora.switches
    _image(client.post(URL, json={**BASE, "lora": {"a": 0.25}, "seed": 4}))
    assert lora.switches == switches
    assert lora.current == {"a": 0.25}


@pytest.mark.parametrize(
    ("lora", "param"),
    [
        ({"nope": 1.0}, "lora.nope"),
        ({"a": 4.5}, "lora.a"),
        ({"a": -5}, "lora.a"),
        ({"a": "1"}, "lora.a"),
        ({"a": True}, "lora.a"),
        ({"a": None}, "lora.a"),
    ],
)
def test_bad_adapter_names_and_weights_are_400(served, lora, param):
    client, _ = served
    r = client.post(URL, json={**BASE, "lora": lora})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["message"].startswith(param + ":")
    assert error["type"] == "invalid_request_error"


def test_non_finite_weight_is_400(served):
    client, _ = served
    r = client.post(
        URL, content=b'{"prompt": "x", "lora": {"a": NaN}}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400  # not JSON at all, or a weight out of range: never a 200 or a 5xx


def test_schema_lists_the_loaded_adapters(served):
    client, _ = served
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ImageGenerationRequest"]
    lora = schema["properties"]["lora"]
    assert lora["propertyNames"] == {"enum": ["a", "b"]}


def test_a_server_without_adapters_refuses_lora_names(fake_pipeline):
    with TestClient(create_app(fake_pipeline, settings=ServerSettings(model_name="fake"))) as client:
        r = client.post(URL, json={"prompt": "x", "lora": {"a": 1.0}})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "lora.a"
        assert "--lora NAME=PATH" in r.json()["error"]["message"]
        assert client.post(URL, json={"prompt": "x", "lora": {}}).status_code == 200


def test_loading_errors_name_the_adapter_and_the_fix(fake_pipeline, tmp_path, adapter_dirs):
    with pytest.raises(LoraError, match="FakePipeline has no LoRA support"):
        load_lora_adapters(fake_pipeline, [("a", tmp_path)])
    from pipelines.diffusers_pipes import build_flux

    pipe, _ = build_flux()
    with pytest.raises(LoraError, match="a: .* does not exist"):
        load_lora_adapters(pipe, [("a", tmp_path / "missing")])
    with pytest.raises(LoraError, match="named twice"):
        load_lora_adapters(pipe, [("a", adapter_dirs["a"]), ("a", adapter_dirs["b"])])
    with pytest.raises(LoraError, match="an adapter name"):
        load_lora_adapters(pipe, [("a.b", adapter_dirs["a"])])
