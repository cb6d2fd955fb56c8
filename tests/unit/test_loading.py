"""load_pipeline: the demo, local folders, Hub ids, dtypes, and one clear LoadError for every bad input."""

from __future__ import annotations

import importlib.util
import json
import time
import warnings

import numpy as np
import pytest
import torch

from pipelines.diffusers_pipes import run
from vramferry.errors import LoadError, OffloadError
from vramferry.pipelines import DTYPES, load_pipeline, parse_dtype
from vramferry.pipelines.extras import require_extra

needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None,
    reason="needs diffusers (pip install 'vramferry[diffusers]')",
)


def _raises_load_error(*culprits: str, **kwargs) -> str:
    with pytest.raises(LoadError) as info:
        load_pipeline(**kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    for culprit in culprits:
        assert culprit in message, f"{culprit!r} not in {message!r}"
    return message


# --- dtypes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("fp32", torch.float32),
        ("fp16", torch.float16),
        ("bf16", torch.bfloat16),
        ("half", torch.float16),
        (" BFloat16 ", torch.bfloat16),
        ("torch.float16", torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_parse_dtype(text, expected):
    assert parse_dtype(text) is expected


@pytest.mark.parametrize("bad", ["float8", "int8", "", "f32x"])
def test_parse_dtype_rejects_unknown_names(bad):
    with pytest.raises(LoadError, match="float32, float16, bfloat16") as info:
        parse_dtype(bad)
    assert repr(bad) in str(info.value)


def test_parse_dtype_rejects_unsupported_torch_dtype():
    with pytest.raises(LoadError, match="torch.int8"):
        parse_dtype(torch.int8)


def test_dtypes_table():
    assert list(DTYPES) == ["float32", "float16", "bfloat16"]


def test_load_error_is_an_offload_error():
    assert issubclass(LoadError, OffloadError)


def test_bad_dtype_fails_before_loading(tmp_path):
    # The folder is not even looked at: the dtype is checked first.
    _raises_load_error(
        "'float64'", "float32, float16, bfloat16", model=str(tmp_path / "missing"), dtype="float64"
    )


def test_require_extra_names_the_extra():
    with pytest.raises(ImportError, match=r"vramferry\[diffusers\]"):
        require_extra("vramferry_no_such_module")


# --- local folders --------------------------------------------------------------------------------------------

# Errors found before diffusers is imported need no extra; loading a real folder does.


def test_load_saved_folder_matches_original(tiny_flux, saved_flux_dir):
    pipe, kwargs = tiny_flux
    loaded = load_pipeline(str(saved_flux_dir))
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    assert all(p.device.type == "cpu" for p in loaded.transformer.parameters())
    np.testing.assert_allclose(run(loaded, kwargs)["images"], run(pipe, kwargs)["images"], atol=1e-5, rtol=0)


def test_load_accepts_path_objects(saved_flux_dir):
    assert type(load_pipeline(saved_flux_dir)).__name__ == "FluxPipeline"


def test_load_folder_with_dtype(saved_flux_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated `torch_dtype`
        loaded = load_pipeline(str(saved_flux_dir), dtype="bfloat16")
    assert loaded.transformer.dtype == torch.bfloat16
    assert loaded.text_encoder_2.dtype == torch.bfloat16


def test_missing_folder(tmp_path):
    missing = tmp_path / "no_such_model"
    _raises_load_error(str(missing), "does not exist", model=str(missing))


def test_missing_relative_folder():
    _raises_load_error("./models/none-here", "does not exist", model="./models/none-here")


def test_file_instead_of_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    _raises_load_error(str(file), "is a file", model=str(file))


def test_folder_without_model_index(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "unet").mkdir()
    message = _raises_load_error(
        str(tmp_path), "model_index.json", "notes.txt", "unet/", "weights.bin", "diffusers pipeline folder",
        model=str(tmp_path),
    )  # fmt: skip
    assert "config.json" not in message


def test_empty_folder(tmp_path):
    _raises_load_error("model_index.json", "it is empty", model=str(tmp_path))


def test_single_model_folder_gets_a_hint(saved_flux_dir):
    _raises_load_error("config.json", "single model", model=str(saved_flux_dir / "transformer"))


def test_long_folder_listing_is_cut(tmp_path):
    for i in range(20):
        (tmp_path / f"file{i:02d}.txt").write_text("")
    message = _raises_load_error("and 12 more", model=str(tmp_path))
    assert "file19.txt" not in message


@needs_diffusers
def test_broken_pipeline_folder(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    _raises_load_error("could not load", str(tmp_path), model=str(tmp_path))


@needs_diffusers
def test_missing_variant(saved_flux_dir):
    _raises_load_error(str(saved_flux_dir), model=str(saved_flux_dir), variant="fp16")


# --- the demo and Hub ids -------------------------------------------------------------------------------------


@needs_diffusers
def test_none_loads_the_demo():
    pipe = load_pipeline(None)
    assert type(pipe).__name__ == "FluxPipeline"
    assert pipe.transformer.config.in_channels == 64


@needs_diffusers
def test_demo_with_dtype():
    pipe = load_pipeline(None, dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16


@needs_diffusers
def test_uncached_hub_id_offline_fails_fast():
    start = time.perf_counter()
    message = _raises_load_error(
        "'nobody-here/no-such-pipeline'", "local", "network", model="nobody-here/no-such-pipeline"
    )
    assert "HF_HUB_OFFLINE" in message
    assert time.perf_counter() - start < 10


@needs_diffusers
def test_hub_failure_when_online(monkeypatch):
    import diffusers
    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise OSError("Repository Not Found for url: https://huggingface.co/api/models/x/y\nmore detail")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    _raises_load_error("'x/y'", "Repository Not Found", "local", model="x/y")
