"""LoRA adapters added, loaded, fused, unfused, deleted and unloaded while a handle is live, in every mode, on the
CPU: each request gives the output of the pipeline without offload carrying the same adapters, only the changed
pieces are packed again, and ``remove()`` gives back the module as the user made it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import vramferry
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, run

peft = pytest.importorskip("peft")

MODES = ["model", "layerwise", "auto"]


def _cfg(mode: str) -> vramferry.OffloadConfig:
    return vramferry.OffloadConfig(mode=mode, onload_device="cpu", verify=True)


def _blocks_config() -> object:
    """An adapter inside the DiT's blocks only (its attention projections)."""
    return peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False)


def _add(pipe) -> None:
    torch.manual_seed(1)  # the same adapter weights in both pipelines
    pipe.transformer.add_adapter(_blocks_config(), adapter_name="a")


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    """A saved LoRA for the tiny Flux transformer, in its blocks and in its non-block part (``proj_out``)."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("lora")
    pipe, _ = DIFFUSERS_PIPELINES["flux"]()
    torch.manual_seed(2)
    config = peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_v", "proj_out"], init_lora_weights=False
    )
    pipe.transformer.add_adapter(config, adapter_name="x")
    layers = get_peft_model_state_dict(pipe.transformer, adapter_name="x")
    diffusers.FluxPipeline.save_lora_weights(folder, transformer_lora_layers=layers)
    return folder


def _load(pipe, folder) -> None:
    pipe.load_lora_weights(str(folder), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])  # both active: fused together, "a" deleted later


def _steps(folder) -> list:
    return [
        ("add_adapter", _add),
        ("load_lora_weights", lambda p: _load(p, folder)),
        ("fuse_lora", lambda p: p.fuse_lora(components=["transformer"])),
        ("unfuse_lora", lambda p: p.unfuse_lora(components=["transformer"])),
        ("delete_adapters", lambda p: p.delete_adapters("a")),
        ("unload_lora_weights", lambda p: p.unload_lora_weights()),
    ]


def _equal(got, expected, what: str) -> None:
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=what)


@pytest.mark.parametrize("mode", MODES)
def test_each_lora_call_while_live_gives_the_output_without_offload(mode, adapter_file, caplog):
    reference, kwargs = DIFFUSERS_PIPELINES["flux"]()
    expected = {}
    for name, step in _steps(adapter_file):
        step(reference)
        expected[name] = run(reference, kwargs)
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    handle = vramferry.apply(pipe, _cfg(mode))
    try:
        run(pipe, kwargs)
        before = handle.stats()
        assert (before.repacked_bytes, before.repacked_pieces) == (0, 0)
        repacked = before
        for name, step in _steps(adapter_file):
            step(pipe)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="vramferry"):
                with torch.inference_mode():  # as servers and benchmarks run requests
                    _equal(run(pipe, kwargs), expected[name], name)
            # Packed again: only pieces of the transformer, the component that changed.
            stats = handle.stats()
            assert stats.repacked_pieces > repacked.repacked_pieces, name
            assert stats.repacked_bytes > repacked.repacked_bytes, name
            packed = [r.getMessage() for r in caplog.records if "packed" in r.getMessage()]
            assert len(packed) == 1 and "packed transformer again" in packed[0], (name, packed)
            repacked = stats
            # Tensors bound by the runtime are never inference tensors, though the request ran in inference mode.
            assert not any(p.is_inference() for p in pipe.transformer.parameters()), name
            _equal(run(pipe, kwargs), expected[name], f"{name}, next request")
            assert handle.stats().repacked_pieces == repacked.repacked_pieces  # nothing changed: nothing packed
    finally:
        handle.remove()
    _equal(run(pipe, kwargs), expected["unload_lora_weights"], "after remove")


@pytest.mark.parametrize("mode", MODES)
def test_an_adapter_added_while_live_packs_only_the_blocks_it_is_in(mode):
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    handle = vramferry.apply(pipe, _cfg(mode))
    try:
        run(pipe, kwargs)
        host = handle.stats().host_pageable_bytes
        _add(pipe)
        run(pipe, kwargs)
        stats = handle.stats()
        # Both of the DiT's blocks hold attention projections; its non-block part and the other components do not.
        assert stats.repacked_pieces == 2
        units = {u.name: u for u in handle.units()}
        blocks = ["transformer.transformer_blocks.0", "transformer.single_transformer_blocks.0"]
        if mode == "layerwise":  # each block a unit of its own, sized as packed
            assert stats.repacked_bytes == sum(units[name].nbytes for name in blocks)
        # The old blocks share their arena with the non-block part, which is kept: that arena stays whole.
        assert stats.host_pageable_bytes == host + stats.repacked_bytes
        pipe.transformer.delete_adapters("a")
        run(pipe, kwargs)
        # The blocks packed with the adapter are released: their arena held nothing else.
        after = handle.stats()
        assert after.repacked_pieces == 4
        assert after.host_pageable_bytes == host + after.repacked_bytes - stats.repacked_bytes
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", MODES)
def test_remove_right_after_a_fuse_gives_back_the_fused_module(mode):
    """No request between the fuse and ``remove()``: in auto mode the DiT is resident, and peft fuses into its
    device copies in place; the module given back holds the fused weights and the adapters, as the user made it."""
    reference, kwargs = DIFFUSERS_PIPELINES["flux"]()
    _add(reference)
    reference.transformer.fuse_lora()
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    params = dict(pipe.transformer.named_parameters())
    handle = vramferry.apply(pipe, _cfg(mode))
    run(pipe, kwargs)
    _add(pipe)
    pipe.transformer.fuse_lora()
    handle.remove()
    want, got = reference.transformer.state_dict(), pipe.transformer.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
        assert got[key].device == want[key].device, key
    after = dict(pipe.transformer.named_parameters())
    assert all(after[key] is params[key] for key in params if key in after)
    for module in (reference.transformer, pipe.transformer):
        module.unfuse_lora()
    _equal(run(pipe, kwargs), run(reference, kwargs), "unfused after remove")


def test_a_component_called_on_its_own_after_a_change_raises_until_refreshed():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    linear = pipe.transformer.time_text_embed.timestep_embedder.linear_1
    x = torch.randn(1, linear.in_features)
    with torch.no_grad():
        expected = linear(x)
    handle = vramferry.apply(pipe, _cfg("model"))
    try:
        run(pipe, kwargs)  # the VAE ran last: calling a DiT module begins its phase, which checks it
        _add(pipe)
        with pytest.raises(vramferry.OffloadError, match=r"transformer: its tensors changed.*handle\.refresh\(\)"):
            with torch.no_grad():
                linear(x)
        assert handle.refresh() and not handle.refresh()
        with torch.no_grad():
            assert torch.equal(linear(x), expected)
    finally:
        handle.remove()


def test_auto_plans_again_for_the_new_sizes_under_a_budget():
    from vramferry.discovery.inventory import inventory_of
    from vramferry.planning import plan

    reference, kwargs = DIFFUSERS_PIPELINES["flux"]()
    _add(reference)
    expected = run(reference, kwargs)
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    inventory = inventory_of(vramferry.discover(pipe))
    resident = plan(inventory, vramferry.OffloadConfig(mode="none")).predicted_peak_bytes
    budget = resident - inventory.get("transformer").bytes // 2  # part of the DiT must move
    handle = vramferry.apply(pipe, mode="auto", onload_device="cpu", verify=True, vram_budget=budget)
    try:
        run(pipe, kwargs)
        before = handle.inventory.get("transformer").bytes
        _add(pipe)
        _equal(run(pipe, kwargs), expected, "auto under a budget")
        # Planned for the transformer with its adapter, within the budget.
        assert handle.inventory.get("transformer").bytes > before
        assert handle.plan.predicted_peak_bytes <= budget
        _equal(run(pipe, kwargs), expected, "next request")
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", ["model", "layerwise"])
def test_adapters_added_and_deleted_on_compressed_weights_while_live(mode):
    pytest.importorskip("zstandard")
    reference, kwargs = DIFFUSERS_PIPELINES["flux"]()
    _add(reference)
    expected = run(reference, kwargs)
    reference.transformer.delete_adapters("a")
    deleted = run(reference, kwargs)
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    handle = vramferry.apply(pipe, _cfg(mode).replace(compression="lossless"))
    try:
        run(pipe, kwargs)
        assert handle.stats().host_compressed_bytes > 0
        _add(pipe)  # the blocks' old bytes are decoded to pack them again with the adapter
        _equal(run(pipe, kwargs), expected, "added")
        # Still compressed, the adapter with them.
        stats = handle.stats()
        assert stats.host_compressed_raw_bytes > 0 and stats.repacked_pieces == 2
        # Between loads the weights are placeholders: peft's fuse cannot write into them.
        with pytest.raises(RuntimeError, match="single memory location"):
            pipe.transformer.fuse_lora()
        pipe.transformer.delete_adapters("a")
        _equal(run(pipe, kwargs), deleted, "deleted")
    finally:
        handle.remove()
    _equal(run(pipe, kwargs), deleted, "after remove")
