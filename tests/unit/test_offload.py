"""Model-level and layerwise offload on CPU: the whole hook machinery, with the CPU as execution device."""

from __future__ import annotations

import inspect
import logging

import numpy as np
import pytest
import torch

import vramferry
from pipelines.custom import CUSTOM_PIPELINES
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, assert_runs_equal, run
from vramferry.api import apply
from vramferry.errors import ConflictError, DeviceError

MODES = ["model", "layerwise", "none"]


def _cfg(mode: str, **kw) -> vramferry.OffloadConfig:
    return vramferry.OffloadConfig(mode=mode, onload_device="cpu", **kw)


def _snapshot(pipe_modules):
    return {
        name: [(id(p), p.data.clone(), p.device) for p in module.parameters()]
        for name, module in pipe_modules.items()
    }


def _call_custom(pipe, kwargs):
    return pipe(**kwargs)


@pytest.mark.parametrize("name", sorted(DIFFUSERS_PIPELINES))
@pytest.mark.parametrize("mode", MODES)
def test_diffusers_output_equals_resident(name, mode):
    pipe, kwargs = DIFFUSERS_PIPELINES[name]()
    expected = run(pipe, kwargs)
    handle = apply(pipe, _cfg(mode, verify=True))
    try:
        # the second request runs after evictions and the learned order
        assert_runs_equal(pipe, kwargs, expected)
        stats = handle.stats()
        assert stats.bytes_d2h == 0
        if mode != "none":
            assert stats.swaps > 0
        if mode == "layerwise" and handle.modules.blocks:
            assert stats.blocks_streamed > 0
    finally:
        handle.remove()
    for key, value in run(pipe, kwargs).items():
        np.testing.assert_array_equal(value, expected[key])


@pytest.mark.parametrize("name", sorted(CUSTOM_PIPELINES))
@pytest.mark.parametrize("mode", MODES)
def test_custom_output_equals_resident(name, mode):
    pipe, kwargs = CUSTOM_PIPELINES[name]()
    expected = _call_custom(pipe, kwargs)
    with apply(pipe, _cfg(mode, verify=True)) as handle:
        for _ in range(2):
            assert torch.equal(_call_custom(pipe, kwargs), expected)
        assert handle.stats().bytes_d2h == 0
    assert torch.equal(_call_custom(pipe, kwargs), expected)


def _unit_states(handle):
    return {unit.name: unit.where for unit in handle.units()}


def _scheduled_bytes(handle) -> int:
    """Bytes one steady-state request moves by the plan's schedule: every swapped part it loads or
    prefetches, once."""
    sizes = {unit.name: unit.nbytes for unit in handle.units()}
    moved = {name for phase in handle.plan.schedule for name in (*phase.loads, *phase.prefetches)}
    return sum(sizes[f"{name}:swap"] for name in moved)


def test_flux_swap_sequence():
    """Which component is on the device before and after each component runs."""
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    handle = apply(pipe, _cfg("model", prefetch_components=False))
    seen = []
    components = {c.name: c.module for c in handle.modules.components()}
    components["vae"] = pipe.vae.decoder  # the pipeline calls vae.decode(), which runs the decoder
    for name, module in components.items():
        module.register_forward_pre_hook(lambda m, a, n=name: seen.append((n, dict(_unit_states(handle)))))
    assert set(_unit_states(handle).values()) == {"host"}
    run(pipe, kwargs)
    order = [n for n, _ in seen]
    assert order[0] == "text_encoder" and "text_encoder_2" in order and order[-1] == "vae"
    # When the transformer's forward starts, its weights are loaded and both encoders are evicted.
    states = next(s for n, s in seen if n == "transformer")
    assert states["transformer:swap"] == "device"
    assert states["text_encoder:swap"] == "host" and states["text_encoder_2:swap"] == "host"
    # While an encoder runs, the transformer is not on the device.
    states = next(s for n, s in seen if n == "text_encoder_2")
    assert states["text_encoder_2:swap"] == "device" and states["transformer:swap"] == "host"
    after = _unit_states(handle)
    # The VAE stays; the transformer left before the decode, since the encoders that start the next request
    # exclude it.
    assert after["vae:swap"] == "device" and after["transformer:swap"] == "host"
    assert after["text_encoder:swap"] == "host"
    handle.remove()


def test_wan_experts_exclude_each_other():
    pipe, kwargs = DIFFUSERS_PIPELINES["wan"]()
    handle = apply(pipe, _cfg("model", prefetch_components=False))
    both = []
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name)
        module.register_forward_pre_hook(
            lambda m, a: both.append(
                (_unit_states(handle)["transformer:swap"], _unit_states(handle)["transformer_2:swap"])
            )
        )
    run(pipe, kwargs)
    assert ("device", "host") in both and ("host", "device") in both
    assert ("device", "device") not in both
    handle.remove()


@pytest.mark.parametrize("budget", [None, "1GiB"])
def test_the_schedule_prefetches_in_request_order_and_a_run_moves_its_bytes(budget):
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    handle = apply(pipe, _cfg("model", vram_budget=budget))
    schedule = handle.plan.schedule
    assert [phase.name for phase in schedule] == ["encoders", "transformer", "vaes"]
    encoders, dit, vaes = schedule
    assert encoders.components == ("text_encoder", "text_encoder_2")
    assert encoders.steps[0].prefetch == ("text_encoder_2",)
    # The DiT excludes the encoders: it is loaded ahead of time only when a budget says there is room.
    assert encoders.steps[1].prefetch == (("transformer",) if budget is not None else ())
    assert set(dit.steps[0].evict) == ({"text_encoder", "text_encoder_2"} if budget is None else set())
    # The encoders start the next request and exclude the DiT: it leaves as the decode begins, and the first
    # encoder's copy starts while the VAE decodes.
    assert "transformer" in vaes.evict and vaes.steps[0].prefetch == ("text_encoder",)
    # Without a budget nothing excludes the VAE and it stays; with one, it leaves as the encoders begin.
    assert ("vae" in encoders.evict) == (budget is not None)
    run(pipe, kwargs)
    handle.reset_stats()
    run(pipe, kwargs)
    stats = handle.stats()
    assert stats.bytes_h2d == _scheduled_bytes(handle) and stats.unplanned_phases == 0
    handle.remove()


@pytest.mark.parametrize("budget", [None, "1GiB"])
def test_the_dit_leaves_the_device_before_the_decode_when_the_encoders_run_next(budget):
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    handle = apply(pipe, _cfg("model", vram_budget=budget))
    during_decode = []
    pipe.vae.decoder.register_forward_pre_hook(
        lambda m, a: during_decode.append(_unit_states(handle)["transformer:swap"])
    )
    expected = run(pipe, {**kwargs, "output_type": "np"})
    got = run(pipe, {**kwargs, "output_type": "np"})  # the DiT is loaded again for the next request
    after = _unit_states(handle)
    handle.remove()
    # The text encoders start the next request and exclude the DiT: it leaves before the decode, not after,
    # and the first encoder's copy starts while the VAE decodes (also when the VAE stayed loaded).
    assert during_decode == ["host", "host"]
    assert after["text_encoder:swap"] == "device" and after["transformer:swap"] == "host"
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def _embedded_call(pipe, kwargs):
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(kwargs["prompt"], prompt_2=None, device="cpu")
    call = {k: v for k, v in kwargs.items() if k != "prompt"}
    return {**call, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "output_type": "np"}


@pytest.mark.parametrize("budget", [None, "1GiB"])
def test_with_prompt_embeddings_and_that_order_the_dit_stays_unless_a_budget_counts_it_in_its_phase(budget):
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    call = _embedded_call(pipe, kwargs)
    expected = run(pipe, call)
    handle = apply(pipe, _cfg("model", vram_budget=budget, order=("transformer", "vae")))
    dit, vaes = handle.plan.schedule
    assert (dit.name, vaes.name) == ("transformer", "vaes")
    during_decode = []
    hook = pipe.vae.decoder.register_forward_pre_hook(
        lambda m, a: during_decode.append(_unit_states(handle)["transformer:swap"])
    )
    run(pipe, call)
    handle.reset_stats()
    got = run(pipe, call)
    stats = handle.stats()
    hook.remove()
    handle.remove()
    if budget is None:
        # Nothing excludes the DiT before its next use: it stays, and the second request moves no bytes.
        assert vaes.evict == () and during_decode == ["device", "device"]
        assert stats.bytes_h2d == 0
    else:
        # The plan counts the DiT's swapped part in its own phase only: it leaves for the decode, and its copy
        # for the next request (not an encoder's, which never runs here) starts while the VAE decodes.
        assert vaes.evict == ("transformer",) and vaes.steps[0].prefetch == ("transformer",)
        assert stats.bytes_h2d == _scheduled_bytes(handle) >= handle.plan.get("transformer").bytes
    assert stats.unplanned_phases == 0
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_skipped_phases_are_counted_warned_once_and_still_correct(caplog):
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    call = _embedded_call(pipe, kwargs)
    expected = run(pipe, call)
    handle = apply(pipe, _cfg("model"))  # the plan expects the encoders before the DiT: they are skipped
    with caplog.at_level(logging.WARNING, logger="vramferry"):
        run(pipe, call)
        got = run(pipe, call)
    stats = handle.stats()
    handle.remove()
    warnings = [r.getMessage() for r in caplog.records if "OffloadConfig(order=" in r.getMessage()]
    assert len(warnings) == 1 and "'transformer' began with 'encoders' skipped" in warnings[0]
    assert stats.unplanned_phases == 1  # the second request's DiT phase; the first had nothing before it
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_returning_latents_skips_the_decode_and_its_evictions_still_apply():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    call = {**kwargs, "output_type": "latent"}
    handle = apply(pipe, _cfg("model"))
    during_encoding = []
    hook = pipe.text_encoder.register_forward_pre_hook(
        lambda m, a: during_encoding.append(_unit_states(handle)["transformer:swap"])
    )
    for _ in range(3):
        run(pipe, call)
    stats = handle.stats()
    hook.remove()
    handle.remove()
    # The decode never runs: the DiT is off the device while the next request's encoders run, and each later
    # request counts one skipped phase (one warning in all).
    assert during_encoding == ["host", "host", "host"]
    assert stats.unplanned_phases == 2


def test_remove_restores_parameters_devices_and_forwards():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    modules = {"transformer": pipe.transformer, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    before = _snapshot(modules)
    signature = inspect.signature(pipe.transformer.forward)
    cls = type(pipe)
    handle = apply(pipe, _cfg("layerwise"))
    assert type(pipe) is not cls  # the execution-device shim
    run(pipe, kwargs)
    assert "device" in {u.where for u in handle.units()}
    handle.remove()
    # The device copies are released by remove itself, while the handle object is still referenced.
    assert {u.where for u in handle.units()} == {"host"}
    assert type(pipe) is cls
    after = _snapshot(modules)
    for name in modules:
        for (id0, data0, dev0), (id1, data1, dev1) in zip(before[name], after[name], strict=True):
            assert id0 == id1 and dev0 == dev1 and torch.equal(data0, data1)
    for module in pipe.transformer.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    assert inspect.signature(pipe.transformer.forward) == signature
    assert "forward" not in vars(pipe.transformer)
    # Nothing shares storage any more: each parameter owns its memory (safetensors requires it).
    ptrs = [p.untyped_storage().data_ptr() for p in pipe.transformer.parameters()]
    assert len(ptrs) == len(set(ptrs))


def test_apply_twice_raises_conflict_naming_the_handle():
    pipe, _ = CUSTOM_PIPELINES["omnigen2"]()
    handle = apply(pipe, _cfg("model"))
    with pytest.raises(ConflictError, match="already offloaded by <OffloadHandle live"):
        apply(pipe, _cfg("model"))
    handle.remove()
    apply(pipe, _cfg("layerwise")).remove()


def test_a_peer_offload_is_refused():
    pipe, _ = DIFFUSERS_PIPELINES["flux"]()
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ConflictError, match="accelerate hook"):
        apply(pipe, _cfg("model"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_cuda_target_without_cuda_is_a_device_error():
    pipe, _ = CUSTOM_PIPELINES["omnigen2"]()
    with pytest.raises(DeviceError, match="onload_device='cpu'"):
        apply(pipe, vramferry.OffloadConfig(mode="model"))
    # Nothing was changed: a later apply works.
    apply(pipe, _cfg("model")).remove()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("mode", ["model", "layerwise", "auto"])
def test_exception_inside_forward_leaves_the_handle_usable(mode, error):
    pipe, kwargs = CUSTOM_PIPELINES["omnigen2"]()
    expected = _call_custom(pipe, kwargs)
    handle = apply(pipe, _cfg(mode))
    block = pipe.transformer.layers[1]
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise error("injected")  # KeyboardInterrupt: Ctrl-C, which skips PyTorch's post hooks

    hook = block.register_forward_pre_hook(boom)
    with pytest.raises(error, match="injected"):
        _call_custom(pipe, kwargs)
    # The DiT is not counted as running any more: the encoder's next start evicts it as the schedule says.
    seen = []

    def dit_on_device(module, args):
        seen.append([u.name for u in handle.units() if u.component == "transformer" and u.kind != "resident"])
        seen[-1] = [name for name in seen[-1] if _unit_states(handle)[name] == "device"]

    probe = pipe.mllm.embed_tokens.register_forward_pre_hook(dit_on_device)
    assert torch.equal(_call_custom(pipe, kwargs), expected)
    probe.remove()
    assert seen and all(names == [] for names in seen)
    hook.remove()
    handle.remove()


def test_entry_points_other_than_forward_trigger_onload():
    """``vae.decode`` and ``mllm.generate`` never call the component's own forward."""
    pipe, kwargs = CUSTOM_PIPELINES["omnigen2"]()
    handle = apply(pipe, _cfg("model", verify=True, prefetch_components=False))
    latents = torch.randn(1, 4, 8, 8)
    assert _unit_states(handle)["vae:swap"] == "host"
    pipe.vae.decode(latents)
    assert _unit_states(handle)["vae:swap"] == "device"
    _, context = pipe.mllm.generate(kwargs["prompt_ids"], max_new_tokens=1)
    assert _unit_states(handle)["mllm:swap"] == "device"
    handle.remove()


def test_host_copies_are_canonical_and_counted():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    weight_bytes = sum(
        p.numel() * p.element_size() for c in (pipe.transformer, pipe.vae) for p in c.parameters()
    )
    handle = apply(pipe, _cfg("model"))
    stats = handle.stats()
    # On the CPU nothing is page-locked; everything sits in pageable arenas, about the weights' size.
    assert stats.host_pinned_bytes == 0
    assert stats.host_pageable_bytes >= weight_bytes
    handle.remove()


@pytest.mark.parametrize("mode", ["model", "layerwise"])
def test_stats_count_and_time_every_dit_call(mode):
    pipe, kwargs = DIFFUSERS_PIPELINES["wan"]()
    calls = []
    for name in ("transformer", "transformer_2"):
        getattr(pipe, name).register_forward_hook(lambda m, a, o: calls.append(1))
    handle = apply(pipe, _cfg(mode))
    run(pipe, kwargs)
    stats = handle.stats()
    assert stats.dit_calls == len(calls) > 0
    assert stats.dit_call_seconds > 0
    assert stats.predicted_step_seconds is None  # the plan's times are for a GPU, not this CPU run
    handle.reset_stats()
    assert handle.stats().dit_calls == 0
    handle.remove()


def test_replan_replaces_weights_only_when_the_placement_changes(monkeypatch):
    import vramferry.planning.planner as planner
    from vramferry.planning.workload import Workload

    pipe, kwargs = DIFFUSERS_PIPELINES["flux_production"]()
    expected = run(pipe, kwargs)
    handle = apply(pipe, _cfg("model"))
    first = handle.plan
    # The same shape places everything alike: the plan's predictions are refreshed, nothing moves.
    assert handle.replan(Workload(height=64, width=64, steps=2)) is False
    assert [c.placement for c in handle.plan.components] == [c.placement for c in first.components]
    # A shape for which the planner streams the transformer's blocks and the current placement does not fit:
    # the weights are re-placed on the device, and only what becomes resident is copied.
    streaming = planner.plan(handle.inventory, _cfg("layerwise"))
    monkeypatch.setattr(planner, "plan", lambda *args, **kw: streaming)
    monkeypatch.setattr(planner, "price", lambda *args, **kw: None)
    before = {u.name: u for u in handle.units()}
    host = (handle.stats().host_pinned_bytes, handle.stats().host_pageable_bytes)
    handle.reset_stats()
    assert handle.replan(Workload(height=2048, width=2048, steps=2)) is True
    assert handle.plan is streaming and handle.active
    became_resident = [
        u
        for u in handle.units()
        if u.kind == "resident" and (u.name not in before or before[u.name].kind != "resident")
    ]
    assert [u.name for u in became_resident] == ["transformer:resident"]
    assert handle.stats().bytes_h2d == sum(u.nbytes for u in became_resident)
    assert (handle.stats().host_pinned_bytes, handle.stats().host_pageable_bytes) == host
    handle.reset_stats()
    for key, value in run(pipe, kwargs).items():
        np.testing.assert_array_equal(value, expected[key])
    assert handle.stats().blocks_streamed > 0
    with pytest.raises(ConflictError):  # the pipeline is still owned by this (live) handle
        apply(pipe, _cfg("model"))
    handle.remove()
    assert not handle.active
    for key, value in run(pipe, kwargs).items():
        np.testing.assert_array_equal(value, expected[key])


def test_request_order_comes_from_discovery_without_a_declared_sequence():
    pipe, _kwargs = CUSTOM_PIPELINES["omnigen2"]()
    # The protocol's declaration order: encoders, then DiTs, then VAEs.
    assert vramferry.discover(pipe).order == ("mllm", "transformer", "vae")


def test_a_layer_added_while_the_handle_is_live_is_packed_with_its_block():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    expected = run(pipe, kwargs)
    handle = apply(pipe, _cfg("model"))
    try:
        run(pipe, kwargs)
        to_q = pipe.transformer.transformer_blocks[0].attn.to_q
        to_q.lora_A = torch.nn.Linear(to_q.in_features, 4, bias=False)  # unused by the forward
        for key, value in run(pipe, kwargs).items():
            np.testing.assert_array_equal(value, expected[key])
        assert handle.stats().repacked_pieces == 1  # the block that holds it
        del to_q.lora_A
        for key, value in run(pipe, kwargs).items():
            np.testing.assert_array_equal(value, expected[key])
        assert handle.stats().repacked_pieces == 2
    finally:
        handle.remove()
    assert not hasattr(to_q, "lora_A")


@pytest.mark.parametrize("mode", ["model", "layerwise", "auto"])
def test_a_module_deep_inside_a_component_loads_its_weights_when_called_directly(mode):
    """A module several levels below a component, outside its blocks, reached from outside any hooked forward
    (as prompt weighting reaches an encoder's token embedding): here the DiT's timestep MLP, three levels down."""
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    linear = pipe.transformer.time_text_embed.timestep_embedder.linear_1
    x = torch.randn(1, linear.in_features)
    with torch.no_grad():
        expected = linear(x)
    handle = apply(pipe, _cfg(mode, verify=True))  # verify: raises if a module runs on unloaded weights
    try:
        run(pipe, kwargs)  # the encoders of the next request are prefetched: the DiT is off the device
        with torch.no_grad():
            got = linear(x)
        where = _unit_states(handle)
    finally:
        handle.remove()
    assert torch.equal(got, expected)
    if mode == "model":  # the DiT was loaded for it, and the encoders left: the exclusion holds
        assert where["transformer:swap"] == "device" and where["text_encoder:swap"] == "host"


@pytest.mark.parametrize("mode", ["model", "layerwise"])
def test_a_module_shared_by_an_encoder_and_the_dit_keeps_them_exclusive(mode):
    pipe, kwargs = CUSTOM_PIPELINES["omnigen2"]()
    pipe.transformer.shared_embedding = pipe.mllm.embed_tokens  # reached from both components
    expected = _call_custom(pipe, kwargs)
    handle = apply(pipe, _cfg(mode, verify=True))
    during_encoding = []

    def dit_units_on_device(module, args):
        states = _unit_states(handle)
        during_encoding.append(
            sorted(n for n, w in states.items() if n.startswith("transformer") and w == "device")
        )

    probe = pipe.mllm.layers[0].register_forward_pre_hook(dit_units_on_device)
    try:
        for _ in range(2):
            assert torch.equal(_call_custom(pipe, kwargs), expected)
        kinds = {u.name: u.kind for u in handle.units()}
    finally:
        probe.remove()
        handle.remove()
        del pipe.transformer.shared_embedding
    # The shared embedding lives in the shared unit, on the device throughout; running it for the encoder
    # starts nothing of the DiT's (its resident non-block part aside, in layerwise mode).
    assert kinds.get("shared") == "shared"
    allowed = [] if mode == "model" else ["transformer:resident"]
    assert during_encoding and all(names == allowed for names in during_encoding)


def test_a_weight_read_outside_any_forward_is_named_under_verify():
    """A pipeline's own code that reads a component's weight directly (no module call, so no hook loads it)."""
    base, kwargs = CUSTOM_PIPELINES["omnigen2"]()

    class _ReadsAWeight(type(base)):
        def __call__(self, *args, **kw):
            self.scale = self.transformer.layers[0].weight_for_scale.sum()  # before the DiT runs
            return super().__call__(*args, **kw)

    pipe = _ReadsAWeight()
    pipe.transformer.layers[0].weight_for_scale = torch.nn.Parameter(torch.ones(4))
    expected = _call_custom(pipe, kwargs)
    handle = apply(pipe, _cfg("model", verify=True))
    try:
        with pytest.raises(
            vramferry.OffloadError, match=r"weight_for_scale is read outside any module's forward"
        ):
            _call_custom(pipe, kwargs)
    finally:
        handle.remove()
    handle = apply(pipe, _cfg("model"))  # without verify: on the CPU the host copy holds the same values
    try:
        assert torch.equal(_call_custom(pipe, kwargs), expected)
    finally:
        handle.remove()
    del pipe.transformer.layers[0].weight_for_scale


def test_verify_keeps_the_pipeline_call_signature():
    # Callers (the server among them) read the call's parameters to see what the pipeline takes.
    pipe, _ = DIFFUSERS_PIPELINES["flux"]()
    before = inspect.signature(type(pipe).__call__)
    handle = apply(pipe, _cfg("model", verify=True))
    try:
        assert inspect.signature(type(pipe).__call__) == before
    finally:
        handle.remove()
