"""On a CUDA device: outputs bitwise equal to the resident run, no weight traffic back to the host, flat memory."""

from __future__ import annotations

import pytest
import torch

import vramferry
from pipelines.custom import CUSTOM_PIPELINES
from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES, assert_runs_equal, run
from vramferry.api import apply

pytestmark = pytest.mark.gpu


def _resident_then_offloaded(name: str, mode: str):
    pipe, kwargs = DIFFUSERS_PIPELINES[name]()
    pipe.to("cuda")
    expected = run(pipe, kwargs)
    handle = apply(pipe, vramferry.OffloadConfig(mode=mode, verify=True))
    return pipe, kwargs, expected, handle


@pytest.mark.parametrize("name", ["flux", "wan", "flux_production"])
@pytest.mark.parametrize("mode", ["model", "layerwise", "auto"])
def test_output_bitwise_equal_to_resident(name, mode):
    pipe, kwargs, expected, handle = _resident_then_offloaded(name, mode)
    try:
        assert_runs_equal(pipe, kwargs, expected)
        stats = handle.stats()
        assert stats.bytes_d2h == 0 and stats.host_pinned_bytes > 0
    finally:
        handle.remove()
    assert all(p.device.type == "cuda" for p in pipe.transformer.parameters())


def test_no_device_to_host_weight_traffic_during_a_request():
    from torch.profiler import ProfilerActivity, profile

    pipe, kwargs, expected, handle = _resident_then_offloaded("flux", "model")
    run(pipe, kwargs)  # warm
    n_tensors = sum(1 for c in handle.modules.components() for _ in c.module.parameters())
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(pipe, kwargs)
        torch.cuda.synchronize()
    d2h = [e for e in prof.events() if "DtoH" in e.name or "Device -> Pageable" in e.name]
    h2d = [e for e in prof.events() if "HtoD" in e.name]
    handle.remove()
    # Weights cross only host->device, one copy per unit; device->host copies are the pipeline's own outputs
    # and scalar reads, far fewer than the weight tensors.
    assert len(h2d) >= 3
    assert len(d2h) < n_tensors // 4, [e.name for e in d2h][:20]


def test_layerwise_memory_is_flat_over_100_steps():
    import gc

    gc.collect()  # what earlier tests left in reference cycles must not be freed during the readings
    pipe, kwargs = CUSTOM_PIPELINES["omnigen2"]()
    pipe.to("cuda")
    handle = apply(pipe, vramferry.OffloadConfig(mode="layerwise", prefetch_depth=2))
    dit = pipe.transformer
    x = torch.randn(1, 4, 8, 8, device="cuda")
    t = torch.full((1,), 500.0, device="cuda")
    ctx = torch.randn(1, 5, 32, device="cuda")
    readings = []
    with torch.inference_mode():
        for _ in range(100):
            dit(x, t, ctx)
            torch.cuda.synchronize()
            readings.append(torch.cuda.memory_allocated())
    handle.remove()
    assert max(readings[5:]) == min(readings[5:]), (min(readings), max(readings))


class _TwoGroups:
    """A DiT of 2 GiB and an encoder of 1 GiB (linear stacks): model-level swaps at a size where the caching
    allocator's reuse of an evicted component's memory shows in reserved memory."""

    _dit_modules = ["transformer"]
    _encoder_modules = ["text_encoder"]
    _vae_modules: list = []

    def __init__(self) -> None:
        def stack(n: int) -> torch.nn.Module:
            layers = [torch.nn.Linear(8192, 8192, bias=False) for _ in range(n)]
            return torch.nn.Sequential(*layers).to(torch.bfloat16).eval()

        self.transformer, self.text_encoder = stack(16), stack(8)

    @torch.inference_mode()
    def __call__(self) -> torch.Tensor:
        x = torch.randn(64, 8192, device="cuda", dtype=torch.bfloat16)
        h = self.text_encoder(x)
        for _ in range(3):
            h = self.transformer(h) / 64
        return h


def test_model_swaps_reuse_the_evicted_components_memory():
    pipe = _TwoGroups()
    # Raw transfers: compressed ones add two staging buffers (one chunk each) beside the swapped weights.
    handle = apply(pipe, vramferry.OffloadConfig(mode="model", compression="off"))
    try:
        pipe()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(5):
            pipe()
        torch.cuda.synchronize()
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    finally:
        handle.remove()
    dit = 16 * 8192 * 8192 * 2
    assert allocated < 1.05 * dit
    # The encoder is loaded into the memory the DiT left and the DiT back into it: one segment, not two.
    assert reserved < 1.1 * dit, (allocated / 2**30, reserved / 2**30)


def test_block_times_are_measured_on_the_gpu():
    pipe, kwargs = DIFFUSERS_PIPELINES["flux_production"]()
    pipe.to("cuda")
    handle = apply(pipe, vramferry.OffloadConfig(mode="layerwise"))
    try:
        for _ in range(2):
            run(pipe, kwargs)
        times = handle.block_times()["transformer"]
    finally:
        handle.remove()
    assert len(times.seconds) == len(pipe.transformer.transformer_blocks) + len(
        pipe.transformer.single_transformer_blocks
    )
    assert all(0 < s < 1 for s in times.seconds)


def test_model_mode_without_a_budget_keeps_what_is_used_next():
    """With the free memory as the budget: the DiT leaves for the decode when the encoders run next, and stays
    when prompt embeddings are passed in and the order says so (no bytes move)."""
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(kwargs["prompt"], prompt_2=None, device="cpu")
    call = {k: v for k, v in kwargs.items() if k != "prompt"}
    call.update(prompt_embeds=embeds.cuda(), pooled_prompt_embeds=pooled.cuda())
    during_decode = []

    def where(handle):
        return {u.name: u.where for u in handle.units()}["transformer:swap"]

    for order, request in (((), kwargs), (("transformer", "vae"), call)):
        handle = apply(pipe, vramferry.OffloadConfig(mode="model", order=order))
        hook = pipe.vae.decoder.register_forward_pre_hook(
            lambda m, a, h=handle: during_decode.append(where(h))
        )
        try:
            for _ in range(2):
                run(pipe, request)
            handle.reset_stats()
            run(pipe, request)
            moved = handle.stats().bytes_h2d
        finally:
            hook.remove()
            handle.remove()
        assert handle.plan.budget_bytes is not None  # the free memory
        if order:
            assert during_decode[-1] == "device" and moved == 0
        else:
            assert during_decode[-1] == "host" and moved > 0


class _BigBlockDiT(torch.nn.Module):
    """16 blocks of 128 MiB between an input and an output projection: a staged load has 16 stages, each copy
    about 2.4 ms long, so a block that did not wait for its stage would read memory not yet written."""

    _offload_block_attrs = ["blocks"]

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = torch.nn.Linear(8192, 8192, bias=False)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8192, 8192, bias=False) for _ in range(16))
        self.proj_out = torch.nn.Linear(8192, 8192, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h) / 64
        return self.proj_out(h)


class _StagedPipeline:
    _dit_modules = ["transformer"]
    _encoder_modules = ["text_encoder"]
    _vae_modules: list = []

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.transformer = _BigBlockDiT().to(torch.bfloat16).eval()
        self.text_encoder = torch.nn.Linear(8192, 8192, bias=False).to(torch.bfloat16).eval()

    @torch.inference_mode()
    def __call__(self) -> torch.Tensor:
        x = torch.randn(64, 8192, device="cuda", dtype=torch.bfloat16)
        h = self.text_encoder(x)  # evicts the DiT: every request loads it again, staged
        for _ in range(3):
            h = self.transformer(h) / 64
        return h.float().cpu()


def test_staged_dit_loads_give_the_resident_output():
    pipe = _StagedPipeline()
    pipe.transformer.cuda()
    pipe.text_encoder.cuda()
    torch.manual_seed(1)
    expected = pipe()
    pipe.transformer.cpu()
    pipe.text_encoder.cpu()
    handle = apply(pipe, vramferry.OffloadConfig(mode="model", verify=True))
    unit = next(u for u in handle.units() if u.name == "transformer:swap")
    try:
        outputs = []
        for _ in range(3):
            torch.manual_seed(1)
            outputs.append(pipe())
        stats = handle.stats()
    finally:
        handle.remove()
    assert unit.stages == 16  # verify=True checked that every block waited for its stage before it ran
    assert stats.bytes_h2d >= 3 * 18 * 8192 * 8192 * 2  # the DiT was loaded (staged) in every request
    for got in outputs:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_one_stage_per_block_gives_the_resident_output(monkeypatch, name):
    import vramferry.runtime.install

    monkeypatch.setattr(vramferry.runtime.install, "STAGE_BYTES", 1)
    pipe, kwargs, expected, handle = _resident_then_offloaded(name, "model")
    try:
        dits = {c.name for c in handle.modules.dits}
        units = [u for u in handle.units() if u.kind == "swap" and u.component in dits]
        assert units and all(u.stages > 1 for u in units)
        assert_runs_equal(pipe, kwargs, expected)
    finally:
        handle.remove()


def test_replacement_on_the_device_gives_the_resident_output_and_copies_what_becomes_resident():
    import dataclasses

    from vramferry.planning import Placement

    pipe, kwargs, expected, handle = _resident_then_offloaded("flux_production", "layerwise")
    try:
        streamed = handle.plan
        components = tuple(
            dataclasses.replace(c, blocks=(Placement.RESIDENT, Placement.STREAMED), prefetch_depth=1)
            if c.name == "transformer"
            else c
            for c in streamed.components
        )
        half = dataclasses.replace(streamed, components=components, schedule=())
        assert_runs_equal(pipe, kwargs, expected)
        sizes = {u.name: u.nbytes for u in handle.units()}
        for target, copied in ((half, sizes["transformer.transformer_blocks.0"]), (streamed, 0)):
            handle.reset_stats()
            assert handle.replan(plan=target) is True
            assert handle.stats().bytes_h2d == copied
            assert_runs_equal(pipe, kwargs, expected)
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", ["model", "layerwise", "auto"])
def test_remove_gives_the_device_memory_back_while_the_handle_lives(mode):
    pipe, kwargs = DIFFUSERS_PIPELINES["flux_production"]()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    handle = apply(pipe, vramferry.OffloadConfig(mode=mode))
    run(pipe, kwargs)
    assert torch.cuda.memory_allocated() > before
    smallest = min(u.nbytes for u in handle.units())
    handle.remove()
    torch.cuda.synchronize()
    # Still referenced here: a device copy left allocated would add to the next apply's peak. What may remain
    # is the pipeline's own state from the run (its scheduler's timesteps on the device), well below any unit.
    assert torch.cuda.memory_allocated() - before < smallest, handle


@pytest.mark.parametrize("mode", ["layerwise", "auto"])
def test_inductor_compiled_blocks_give_the_compiled_resident_output(mode):
    pipe, kwargs = DIFFUSERS_PIPELINES["flux"]()
    pipe.to("cuda")
    torch._dynamo.reset()
    for block in [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]:
        block.compile(fullgraph=True)
    expected = run(pipe, kwargs)
    handle = apply(pipe, vramferry.OffloadConfig(mode=mode, verify=True))
    try:
        assert_runs_equal(pipe, kwargs, expected)
        with torch.compiler.set_stance("fail_on_recompile"):
            assert_runs_equal(pipe, kwargs, expected)
    finally:
        handle.remove()
        torch._dynamo.reset()


def test_handles_dropped_without_remove_leave_every_next_arena_page_locked():
    """A handle dropped without ``remove`` unlocks its arenas before their memory goes: the next arenas, mapped at
    the same addresses, are page-locked and copied from as usual."""
    import gc

    for _ in range(4):
        pipe, kwargs, expected, handle = _resident_then_offloaded("flux_production", "layerwise")
        stats = handle.stats()
        assert stats.host_pageable_bytes == 0 and stats.host_pinned_bytes > 0, stats
        assert_runs_equal(pipe, kwargs, expected)
        del pipe, handle, stats
        gc.collect()
