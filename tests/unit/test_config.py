"""OffloadConfig: validation naming the field, JSON round trip, immutability, an import without CUDA."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from vramferry.config import CONFIG_VERSION, OffloadConfig, OffloadMode


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "fast"),
        ("mode", ""),
        ("vram_budget", "lots"),
        ("vram_budget", "0%"),
        ("vram_budget", "150%"),
        ("vram_budget", "x%"),
        ("vram_budget", 0),
        ("vram_budget", -1),
        ("vram_budget", True),
        ("onload_device", "gpu0"),
        ("onload_device", "cuda:x"),
        ("prefetch_depth", 0),
        ("prefetch_depth", -2),
        ("prefetch_depth", 1.5),
        ("prefetch_depth", True),
        ("prefetch_depth", "2"),
        ("safety_margin", "a little"),
        ("host_memory_limit", "much"),
        ("keep_resident", "vae"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        OffloadConfig(**{field: value})


def test_good_values_are_normalised():
    config = OffloadConfig(
        mode="layerwise",
        vram_budget=" 80% ",
        onload_device="cuda:1",
        prefetch_depth=3,
        keep_resident=["vae"],
        block_attrs={"transformer": "blocks"},
    )
    assert config.mode is OffloadMode.LAYERWISE
    assert config.vram_budget == "80%"
    assert config.keep_resident == ("vae",)
    assert config.block_attrs == {"transformer": ("blocks",)}
    assert config.device.type == "cuda" and config.device.index == 1
    assert OffloadConfig(vram_budget="16GiB").vram_budget == "16GiB"
    assert OffloadConfig(onload_device="cpu").onload_device == "cpu"


def test_json_round_trip():
    config = OffloadConfig(
        mode="auto",
        vram_budget="12GiB",
        keep_resident=("text_encoder",),
        block_attrs={"transformer": ("transformer_blocks", "single_transformer_blocks")},
        prefetch_depth=2,
        verify=True,
    )
    text = config.to_json()
    assert json.loads(text)["version"] == CONFIG_VERSION
    assert OffloadConfig.from_json(text) == config
    assert OffloadConfig.from_dict(config.to_dict()) == config


def test_from_dict_rejects_unknown_fields_and_versions():
    with pytest.raises(ValueError, match="vram_budgett"):
        OffloadConfig.from_dict({"vram_budgett": "1GiB"})
    with pytest.raises(ValueError, match="version"):
        OffloadConfig.from_dict({"version": CONFIG_VERSION + 1})


def test_replace_returns_a_copy_and_leaves_the_original():
    config = OffloadConfig(mode="model", vram_budget="8GiB")
    other = config.replace(mode="layerwise", prefetch_depth=4)
    assert other.mode is OffloadMode.LAYERWISE and other.prefetch_depth == 4
    assert config.mode is OffloadMode.MODEL and config.prefetch_depth is None
    with pytest.raises(ValueError, match="prefetch_depth"):
        config.replace(prefetch_depth=0)


def test_config_is_frozen():
    config = OffloadConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mode = OffloadMode.NONE  # type: ignore[misc]


def test_importing_vramferry_initialises_no_cuda_and_changes_no_torch_global():
    code = (
        "import torch\n"
        "dtype = torch.get_default_dtype()\n"
        "import vramferry, vramferry.planning, vramferry.planning.costmodel, vramferry.config\n"
        "from vramferry.planning.archs import ARCHS\n"
        "vramferry.OffloadConfig(onload_device='cuda')\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised on import'\n"
        "assert torch.get_default_dtype() == dtype\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "field, value",
    [
        ("vram_budget", float("nan")),
        ("vram_budget", float("inf")),
        ("vram_budget", True),
        ("host_memory_limit", float("nan")),
        ("host_memory_limit", float("-inf")),
        ("safety_margin", float("inf")),
        ("safety_margin", False),
        ("prefetch_depth", True),
        ("prefetch_depth", 2.0),
        ("pin_memory", 1),
        ("verify", "yes"),
    ],
)
def test_config_numbers_and_flags_reject_nan_infinity_and_wrong_types_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        OffloadConfig(**{field: value})


def test_keep_resident_names_must_be_components():
    import vramferry
    from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES

    pipe, _kwargs = DIFFUSERS_PIPELINES["flux"]()
    with pytest.raises(
        vramferry.PlanError, match=r"keep_resident: 'text_encodr'.*text_encoder, text_encoder_2"
    ):
        vramferry.apply(
            pipe, OffloadConfig(mode="model", onload_device="cpu", keep_resident=("text_encodr",))
        )
    vramferry.apply(pipe, OffloadConfig(mode="model", onload_device="cpu")).remove()  # nothing was changed
