"""Host memory as a budget: below the weights, the pieces that move least stay mapped in their checkpoint files
(priced at the pageable bandwidth by the planner, never copied into the host store), with outputs unchanged."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import vramferry
from pipelines.diffusers_pipes import run
from vramferry.config import OffloadConfig
from vramferry.planning.archs import ARCHS
from vramferry.planning.devices import PRESETS
from vramferry.planning.plan import Placement, plan_from_dict, plan_to_dict
from vramferry.planning.planner import plan

GiB = 2**30
CPU = {"onload_device": "cpu", "pin_memory": False}


def _flux_plan(**config):
    inventory = ARCHS["flux1-dev"].inventory()
    return inventory, plan(inventory, OffloadConfig(**config), device=PRESETS["h200"])


def _mapped_by_placement(inventory, the_plan) -> dict[str, int]:
    """Bytes mapped, by where the piece is placed."""
    found: dict[str, int] = {}
    for size in inventory.components:
        cplan = the_plan.get(size.name)
        blocks = cplan.blocks or (cplan.placement,) * len(size.block_bytes)
        sizes = [size.rest_bytes if size.block_bytes else size.bytes, *size.block_bytes]
        for nbytes, where, mapped in zip(sizes, (cplan.placement, *blocks), cplan.mapped or (), strict=False):
            if mapped:
                found[str(where)] = found.get(str(where), 0) + nbytes
    return found


def test_without_a_host_limit_nothing_is_mapped():
    _inventory, the_plan = _flux_plan(mode="auto", vram_budget="16GiB")
    assert all(not any(c.mapped) for c in the_plan.components)
    assert the_plan.host_limit_bytes is None
    (note,) = [n for n in the_plan.notes if n.startswith("host:")]
    assert note.endswith("in the host store (no host_memory_limit)")


def test_a_host_limit_maps_the_resident_pieces_first_and_costs_nothing_per_request():
    inventory, free = _flux_plan(mode="auto", vram_budget="16GiB")
    _inventory, limited = _flux_plan(mode="auto", vram_budget="16GiB", host_memory_limit="20GiB")
    by_place = _mapped_by_placement(inventory, limited)
    assert set(by_place) == {str(Placement.RESIDENT)}  # resident pieces cross the link once, at apply
    assert sum(by_place.values()) >= inventory.total_bytes - 20 * GiB
    assert limited.predicted_request_s == pytest.approx(free.predicted_request_s)
    (note,) = [n for n in limited.notes if n.startswith("host:")]
    assert "left mapped in the checkpoint files" in note and "0 B per request" in note


def test_a_tighter_host_limit_maps_moved_pieces_and_prices_them_at_the_pageable_bandwidth():
    inventory, free = _flux_plan(mode="layerwise")
    _inventory, limited = _flux_plan(mode="layerwise", host_memory_limit="8GiB")
    by_place = _mapped_by_placement(inventory, limited)
    assert by_place.get(str(Placement.STREAMED), 0) > 0
    pinned = inventory.total_bytes - sum(by_place.values())
    assert pinned <= 8 * GiB
    # Streamed blocks copied from pageable memory: the step is slower, by about the bandwidth ratio on the
    # share of the bytes that is mapped.
    assert limited.predicted_step_s > 2 * free.predicted_step_s
    assert plan_from_dict(plan_to_dict(limited)) == limited


def test_a_saved_pipeline_leaves_pieces_mapped_under_a_host_limit(tiny_flux, tmp_path):
    import diffusers

    pipe, kwargs = tiny_flux
    expected = run(pipe, kwargs)
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    before = {name: (p, p.detach().clone()) for name, p in loaded.transformer.named_parameters()}
    weights = sum(p.numel() * p.element_size() for c in loaded.components.values() if hasattr(c, "parameters")
                  for p in c.parameters())  # fmt: skip
    handle = vramferry.apply(loaded, mode="layerwise", host_memory_limit=weights // 4, verify=True, **CPU)
    try:
        stats = handle.stats()
        assert stats.host_mapped_bytes >= weights - weights // 4 - 2**20
        assert stats.host_pinned_bytes + stats.host_pageable_bytes < weights // 2
        mapped = [c for c in handle.plan.components if any(c.mapped)]
        assert mapped, "the plan names the mapped pieces"
        for _ in range(2):
            got = run(loaded, kwargs)
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key])
    finally:
        handle.remove()
    # remove() gives back the same parameters with the same values. (Not the same addresses: packed pieces stay
    # in the host store's aligned copies, and CPU kernels may round differently for weights at another alignment
    # than a file's, so the output is compared to the last rounding bit only.)
    for name, p in loaded.transformer.named_parameters():
        assert p is before[name][0] and p.device.type == "cpu"
        assert torch.equal(p.detach(), before[name][1]), name
    got = run(loaded, kwargs)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_load_with_a_ram_budget_keeps_the_checkpoint_mapped(saved_flux_dir, tiny_flux):
    pipe, kwargs = tiny_flux
    expected = run(pipe, kwargs)
    with vramferry.load(saved_flux_dir, mode="layerwise", host_memory_limit="1KiB", **CPU) as handle:
        handle.pipeline.set_progress_bar_config(disable=True)
        stats = handle.stats()
        assert stats.host_mapped_bytes > 0
        gc.collect()
        with open("/proc/self/maps") as maps:
            assert any(str(saved_flux_dir) in line for line in maps), "mapped pieces keep their files mapped"
        got = run(handle.pipeline, kwargs)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_weights_in_memory_are_packed_whatever_the_host_limit(tiny_flux):
    pipe, kwargs = tiny_flux
    expected = run(pipe, kwargs)
    with vramferry.apply(pipe, mode="layerwise", host_memory_limit="1KiB", **CPU) as handle:
        stats = handle.stats()
        assert stats.host_mapped_bytes == 0 and stats.host_pageable_bytes > 0
        got = run(pipe, kwargs)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_the_cli_takes_a_ram_budget_and_shows_the_host_side(capsys):
    from vramferry.cli import main

    assert main(["plan", "--arch", "flux1-dev", "--gpu", "h200", "--vram-budget", "16GiB", "--ram-budget", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "host: " in out and "left mapped in the checkpoint files (host_memory_limit 8.00 GiB)" in out


def test_an_adapter_added_to_mapped_pieces_packs_them_and_gives_the_adapted_output(saved_flux_dir, tiny_flux):
    import diffusers

    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False)
    reference = diffusers.DiffusionPipeline.from_pretrained(saved_flux_dir)
    reference.set_progress_bar_config(disable=True)
    _in_memory(reference)  # the offloaded blocks compute on aligned copies; CPU kernels round by alignment
    _pipe, kwargs = tiny_flux
    with vramferry.load(saved_flux_dir, mode="layerwise", host_memory_limit="1KiB", **CPU) as handle:
        handle.pipeline.set_progress_bar_config(disable=True)
        mapped = handle.stats().host_mapped_bytes
        assert mapped > 0
        lora = _with_adapter(handle.pipeline.transformer, config)
        _with_adapter(reference.transformer, config, lora)
        got = run(handle.pipeline, kwargs)
        stats = handle.stats()
        assert stats.repacked_pieces > 0
        assert stats.host_mapped_bytes < mapped  # the pieces holding the adapter were packed
    expected = run(reference, kwargs)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def _in_memory(pipe) -> None:
    """Move ``pipe``'s weights from their file mappings into ordinary (aligned) memory, values unchanged."""
    with torch.no_grad():
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for p in component.parameters():
                    p.data = p.data.clone()


def _with_adapter(transformer, config, state=None):
    """Add adapter ``a`` with the given LoRA weights (or fresh ones, returned)."""
    transformer.add_adapter(config, adapter_name="a")
    lora = {k: v for k, v in transformer.state_dict().items() if "lora_" in k}
    if state is None:
        return {k: v.clone() for k, v in lora.items()}
    transformer.load_state_dict(state, strict=False)
    return state
