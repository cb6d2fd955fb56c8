"""The compressed cache beside a checkpoint (``vramferry compress``), with the CPU codec: apply and load read it
instead of compressing, with outputs bitwise equal to the run without it; entries that do not match the weights,
or whose files are corrupt, are warned about and compressed at apply instead."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import vramferry
from pipelines.diffusers_pipes import run
from vramferry.cli import main
from vramferry.runtime.cache import prefetch_paths

pytest.importorskip("zstandard")
diffusers = pytest.importorskip("diffusers")

CPU = {"onload_device": "cpu", "pin_memory": False, "compression": "lossless"}
COMPRESS = ["--compression", "lossless", "--onload-device", "cpu", "-q"]


@pytest.fixture
def folder(tiny_flux, tmp_path):
    pipe, _kwargs = tiny_flux
    path = tmp_path / "flux"
    pipe.save_pretrained(path)
    return path


def _load(folder, kwargs, **config):
    """``(stats, outputs)`` of a load of ``folder`` (removed again)."""
    with vramferry.load(folder, **{**CPU, "mode": "model", **config}) as handle:
        handle.pipeline.set_progress_bar_config(disable=True)
        return handle.stats(), run(handle.pipeline, kwargs)


def _equal(first, second):
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "vramferry" in r.name]


def _rewrite(path, change):
    """Save the safetensors file ``path`` again with ``change(tensors)`` applied."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_load_reads_the_compressed_bytes_instead_of_compressing(folder, tiny_flux, capsys, caplog):
    _pipe, kwargs = tiny_flux
    fresh, expected = _load(folder, kwargs)
    assert fresh.compressed_from_cache == 0 and fresh.compressed_at_apply > 0
    assert main(["compress", str(folder), *COMPRESS]) == 0
    out = capsys.readouterr().out
    assert "with zstd-planes" in out and str(folder / ".vramferry" / "compressed") in out
    caplog.set_level(logging.INFO, logger="vramferry")
    cached, got = _load(folder, kwargs)
    _equal(got, expected)
    assert cached.compressed_from_cache == fresh.compressed_at_apply and cached.compressed_at_apply == 0
    assert cached.host_compressed_bytes == fresh.host_compressed_bytes  # the same compressed bytes, kept
    # The compressed pieces' raw bytes were never read from the checkpoint: what was read fits in the raw arenas.
    raw_arenas = cached.host_pageable_bytes - cached.host_compressed_bytes
    assert cached.host_file_bytes <= raw_arenas < fresh.host_file_bytes
    assert not _warnings(caplog)
    assert any(f"{cached.compressed_from_cache} piece(s) read from the cache" in m for m in caplog.messages)
    # Compressing again finds every piece up to date.
    assert main(["compress", str(folder), *COMPRESS]) == 0
    assert "compressed 0 piece(s)" in capsys.readouterr().out


def test_apply_finds_the_cache_of_its_folder_or_the_one_given(folder, tiny_flux, tmp_path, capsys):
    _pipe, kwargs = tiny_flux
    elsewhere = tmp_path / "cache"
    assert main(["compress", str(folder), *COMPRESS, "--cache-dir", str(elsewhere)]) == 0
    assert not (folder / ".vramferry").exists()

    def applied(**config):
        """``(stats, outputs, outputs after remove())`` of a pipeline fresh from its folder."""
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder)  # it records its folder
        pipe.set_progress_bar_config(disable=True)
        with vramferry.apply(pipe, mode="model", **CPU, **config) as handle:
            stats, outputs = handle.stats(), run(pipe, kwargs)
        return stats, outputs, run(pipe, kwargs)

    nothing, expected, _ = applied()  # auto: the folder has no cache
    assert nothing.compressed_from_cache == 0
    given, got, after = applied(compression_cache=str(elsewhere))
    assert given.compressed_from_cache == nothing.compressed_at_apply and given.compressed_at_apply == 0
    _equal(got, expected)
    _equal(after, expected)
    assert main(["compress", str(folder), *COMPRESS]) == 0
    assert applied()[0].compressed_from_cache == given.compressed_from_cache
    assert applied(compression_cache="off")[0].compressed_from_cache == 0


def test_a_changed_weight_file_invalidates_its_entries(folder, tiny_flux, capsys, caplog):
    _pipe, kwargs = tiny_flux
    assert main(["compress", str(folder), *COMPRESS]) == 0
    before, _ = _load(folder, kwargs)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    name = "transformer_blocks.0.ff.net.2.weight"
    _rewrite(weights, lambda t: t[name].mul_(2))
    expected = _load(folder, kwargs, compression_cache="off")[1]
    stale, got = _load(folder, kwargs)
    _equal(got, expected)
    transformer = 3  # its non-block part and two blocks, all moved in model mode
    assert stale.compressed_at_apply == transformer
    assert stale.compressed_from_cache == before.compressed_from_cache - transformer
    [warning] = _warnings(caplog)
    assert "transformer.transformer_blocks.0 (transformer/diffusion_pytorch_model.safetensors changed" in warning
    assert f"vramferry compress {folder}" in warning
    # Compressing again makes exactly the stale pieces anew.
    assert main(["compress", str(folder), *COMPRESS]) == 0
    assert f"compressed {transformer} piece(s)" in capsys.readouterr().out
    caplog.clear()
    again, got = _load(folder, kwargs)
    assert again.compressed_from_cache == before.compressed_from_cache and not _warnings(caplog)
    _equal(got, expected)


def test_weights_loaded_in_another_dtype_do_not_use_the_cache(folder, tiny_flux, caplog):
    _pipe, kwargs = tiny_flux
    assert main(["compress", str(folder), *COMPRESS]) == 0
    expected = _load(folder, kwargs, compression_cache="off", dtype="bfloat16")[1]
    stats, got = _load(folder, kwargs, dtype="bfloat16")
    _equal(got, expected)
    assert stats.compressed_from_cache == 0 and stats.compressed_at_apply > 0
    [warning] = _warnings(caplog)
    assert "is torch.bfloat16" in warning and "compressed as torch.float32" in warning


def test_rehash_catches_a_file_rewritten_with_the_same_size_and_time(folder, tiny_flux, capsys):
    _pipe, kwargs = tiny_flux
    assert main(["compress", str(folder), *COMPRESS]) == 0
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    stat = os.stat(weights)
    with open(weights, "r+b") as f:  # flip bytes near the end: tensor data, not the header
        f.seek(stat.st_size - 64)
        data = bytearray(f.read(16))
        f.seek(stat.st_size - 64)
        f.write(bytes(b ^ 0x5A for b in data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert main(["compress", str(folder), *COMPRESS]) == 0
    assert "compressed 0 piece(s)" in capsys.readouterr().out  # the size and time cannot tell
    assert main(["compress", str(folder), *COMPRESS, "--rehash"]) == 0
    assert "compressed 1 piece(s)" in capsys.readouterr().out  # the vae's one piece: its SHA-256 differs
    expected = _load(folder, kwargs, compression_cache="off")[1]
    _equal(_load(folder, kwargs)[1], expected)


def test_a_corrupt_cache_is_detected(folder, tiny_flux, caplog):
    _pipe, kwargs = tiny_flux
    expected = _load(folder, kwargs, compression_cache="off")[1]
    assert main(["compress", str(folder), *COMPRESS]) == 0
    cache = folder / ".vramferry" / "compressed"
    blocks = cache / "zstd-planes" / "transformer"
    flipped = blocks / "transformer_blocks.0.bin"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit, inside the raw low plane: only the checksum can tell
    flipped.write_bytes(bytes(data))
    truncated = blocks / "single_transformer_blocks.0.bin"
    truncated.write_bytes(truncated.read_bytes()[:-5])
    stats, got = _load(folder, kwargs)
    _equal(got, expected)
    assert stats.compressed_at_apply == 2
    [warning] = _warnings(caplog)
    assert "transformer.transformer_blocks.0 (zstd-planes/transformer/transformer_blocks.0.bin is corrupt" in warning
    assert "single_transformer_blocks.0.bin holds" in warning and "(truncated or replaced)" in warning
    # An index that cannot be read: one warning, and everything compressed at apply.
    caplog.clear()
    (cache / "index.json").write_text("{not json")
    stats, got = _load(folder, kwargs)
    _equal(got, expected)
    assert stats.compressed_from_cache == 0 and stats.compressed_at_apply > 2
    [warning] = _warnings(caplog)
    assert "is not used" in warning and "index.json cannot be read" in warning


def test_a_cache_of_some_components_serves_them_alone(folder, tiny_flux, caplog):
    _pipe, kwargs = tiny_flux
    report = vramferry.compress(folder, onload_device="cpu", compression="lossless", components=["transformer"])
    assert (report.written, report.kept, report.codec) == (3, 0, "zstd-planes")
    assert 0 < report.compressed_bytes < report.raw_bytes and report.cache_dir == folder / ".vramferry" / "compressed"
    stats, _ = _load(folder, kwargs)
    assert stats.compressed_from_cache == 3 and stats.compressed_at_apply > 0
    assert not _warnings(caplog)  # pieces without an entry are compressed as without a cache
    # load() reads ahead the cache's files and the checkpoint files it does not cover.
    ahead = prefetch_paths(folder, "auto", "cpu")
    assert sorted(Path(p).name for p in ahead if p.endswith(".bin")) == [
        "rest.bin", "single_transformer_blocks.0.bin", "transformer_blocks.0.bin"
    ]  # fmt: skip
    assert {Path(p).parent.name for p in ahead if p.endswith(".safetensors")} == {"vae", "text_encoder", "text_encoder_2"}
    assert prefetch_paths(folder, "off", "cpu") is None and prefetch_paths(folder, "auto", "cuda") is None


def test_compress_explains_what_it_cannot_do(folder, capsys):
    assert main(["compress", str(folder), "--onload-device", "cpu"]) == 0  # auto on the CPU: no link to save
    err = capsys.readouterr().err
    assert "nothing to compress" in err and "--compression lossless" in err
    assert not (folder / ".vramferry").exists()
    assert main(["compress", str(folder / "missing"), "--onload-device", "cpu"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["compress", str(folder), *COMPRESS, "--components", "vea"]) == 2
    assert "vea not in the pipeline; it has transformer" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["compress", str(folder), *COMPRESS, "--codec", "nvcomp-ans"]) == 2
        assert "--codec zstd-planes" in capsys.readouterr().err


def test_config_compression_cache_is_validated_and_round_trips(tmp_path):
    config = vramferry.OffloadConfig(compression_cache=tmp_path)
    assert config.compression_cache == str(tmp_path)
    assert vramferry.OffloadConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="compression_cache: expected 'auto', 'off' or a folder"):
        vramferry.OffloadConfig(compression_cache="")
