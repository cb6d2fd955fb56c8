"""The kernel warm-up: each distinct layer of a pipeline, run once on scratch weights of its shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import vramferry
from pipelines.diffusers_pipes import run
from vramferry.discovery import Component, PipelineModules, Role, discover
from vramferry.planning.workload import Workload
from vramferry.runtime.warmup import Op, Warmup, pipeline_ops, run_op

SMALL = Workload(height=64, width=64, text_tokens=16)


def test_every_linear_layer_of_the_transformer_is_warmed_at_the_image_token_count(tiny_flux):
    pipe, _ = tiny_flux
    ops = pipeline_ops(discover(pipe), SMALL)
    image_tokens = SMALL.sequence_length(joint_text=False)
    warmed = {(op.shape[1:], op.dtype) for op in ops if op.kind == "linear" and op.shape[0] == image_tokens}
    for name, layer in pipe.transformer.named_modules():
        if isinstance(layer, nn.Linear):
            key = ((layer.in_features, layer.out_features, layer.bias is not None), layer.weight.dtype)
            assert key in warmed, name


def test_the_vae_convolutions_and_the_attention_heads_are_warmed(tiny_flux):
    pipe, _ = tiny_flux
    ops = pipeline_ops(discover(pipe), SMALL)
    convs = {(op.shape[1], op.shape[2], op.shape[3]) for op in ops if op.kind == "conv"}
    for name, layer in pipe.vae.named_modules():
        if isinstance(layer, nn.Conv2d):
            assert (layer.in_channels, layer.out_channels, layer.kernel_size) in convs, name
    attention = pipe.transformer.transformer_blocks[0].attn
    head_dim = attention.to_q.out_features // attention.heads
    assert any(
        op.kind == "attention" and op.shape[0] == attention.heads and op.shape[2] == head_dim for op in ops
    )


def test_every_op_of_every_test_pipeline_runs(diffusers_pipeline):
    _name, pipe, _kwargs = diffusers_pipeline
    ops = pipeline_ops(discover(pipe), SMALL)
    assert {"linear", "softmax", "activation"} <= {op.kind for op in ops}
    warmup = Warmup(ops, torch.device("cpu"), limit=2**40)
    warmup.run()
    assert warmup.error is None
    assert warmup.ran == ops


#: Calls that are views, allocations or dtype bookkeeping (no kernel of their own, or the kernels of the calls
#: they make, which are listed themselves), and the ones a request makes that no warm-up needs: random noise (the
#: scratch tensors' ``normal_``) and dropout (off at inference).
_NOT_KERNELS = {
    "view", "reshape", "transpose", "permute", "unsqueeze", "expand", "expand_as", "slice", "select",
    "as_strided", "t", "_unsafe_view", "empty", "empty_strided", "empty_like", "squeeze", "split", "chunk",
    "narrow", "detach", "detach_", "alias", "lift_fresh", "lift_fresh_copy", "_reshape_alias", "view_as",
    "flatten", "unflatten", "split_with_sizes", "unbind", "contiguous", "clone", "resolve_conj", "resolve_neg",
    "to", "item", "_local_scalar_dense", "linear", "matmul", "result_type", "randn", "dropout", "zeros",
}  # fmt: skip


def _operators(call) -> set[tuple[str, tuple[str, ...]]]:
    """The ATen operators ``call`` runs, each with the dtypes of its inputs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, torch.no_grad():
        call()
    found = set()
    for event in prof.events():
        name = event.name.removeprefix("aten::")
        if event.name.startswith("aten::") and name not in _NOT_KERNELS:
            dtypes = {str(t) for t in event.input_dtypes if t and not str(t).startswith("Scalar")}  # tensors'
            found.add((name, tuple(sorted(dtypes))))
    return found


def test_the_warm_up_calls_every_operator_a_flux_request_calls_with_the_same_dtypes():
    from pipelines.diffusers_pipes import build_flux_production

    pipe, kwargs = build_flux_production()  # FLUX.1's components: CLIP and T5 encoders, the DiT, the VAE
    pipe.to(torch.bfloat16)  # as FLUX.1 runs
    pipe.set_progress_bar_config(disable=True)
    workload = Workload(height=kwargs["height"], width=kwargs["width"], text_tokens=kwargs["max_sequence_length"])
    warmup = Warmup(pipeline_ops(discover(pipe), workload), torch.device("cpu"), limit=2**40)
    warmed = _operators(warmup.run)
    assert warmup.error is None
    missing = _operators(lambda: run(pipe, kwargs)) - warmed
    assert not missing, f"a FLUX.1 request calls operators the warm-up never runs: {sorted(missing)}"


def test_ops_run_at_their_shapes():
    linear = run_op(Op("linear", (7, 16, 24, True), torch.float32), torch.device("cpu"))
    assert linear.shape == (7, 24)
    conv = Op("conv", (2, 4, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, False, (16, 16)), torch.bfloat16)
    out = run_op(conv, torch.device("cpu"))
    assert out.shape == (1, 8, 8, 8) and out.dtype == torch.bfloat16
    attention = run_op(Op("attention", (2, 10, 8, False, "per_head"), torch.float32), torch.device("cpu"))
    assert attention.shape == (1, 2, 10, 8)


def test_ops_larger_than_the_limit_are_skipped():
    small, large = (
        Op("linear", (4, 8, 8, False), torch.float32),
        Op("linear", (4096, 4096, 4096, False), torch.float32),
    )
    warmup = Warmup([small, large], torch.device("cpu"), limit=large.nbytes() - 1)
    warmup.run()
    assert warmup.ran == [small] and warmup.skipped == [large]


def test_a_failing_warm_up_stops_without_raising():
    good = Op("linear", (4, 8, 8, False), torch.float32)
    warmup = Warmup([Op("unknown", (), torch.float32), good], torch.device("cpu")).start()
    warmup.join()
    assert "unknown warm-up op" in str(warmup.error)
    assert warmup.ran == []


def test_quantized_and_integer_weights_are_left_alone():
    layer = nn.Linear(8, 8)
    layer.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    model = nn.Sequential(nn.Linear(8, 4), layer)
    linears = [op for op in _ops_of_model(model) if op.kind == "linear"]
    assert {op.shape[1:] for op in linears} == {(8, 4, True)}


def _ops_of_model(model: nn.Module) -> list[Op]:
    modules = PipelineModules("Pipe", "scan", dits=[Component("transformer", model, Role.DIT, "scan")])
    return pipeline_ops(modules, SMALL)


def test_warm_up_must_be_true_or_false():
    with pytest.raises(ValueError, match="warm_up"):
        vramferry.OffloadConfig(warm_up="yes")


def test_apply_without_a_gpu_warms_nothing_and_gives_the_resident_output(tiny_flux):
    pipe, kwargs = tiny_flux
    expected = run(pipe, kwargs)
    with vramferry.apply(pipe, mode="layerwise", onload_device="cpu", pin_memory=False) as handle:
        assert not any("warm-up" in step for step in handle.stats().apply_seconds)
        got = run(pipe, kwargs)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
