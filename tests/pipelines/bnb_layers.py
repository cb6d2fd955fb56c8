"""A transformer's ``nn.Linear`` layers replaced by bitsandbytes ``Linear4bit`` (nf4 or fp4) or ``Linear8bitLt``
layers, quantized on the CPU the way bitsandbytes quantizes: on the first move to a device.

diffusers' ``BitsAndBytesConfig`` path (``from_pretrained(..., quantization_config=...)``) needs a GPU; the layers
and parameters made here are the ones it makes (``Params4bit`` with its ``quant_state``, ``Int8Params`` with
``SCB``).
"""

from __future__ import annotations

import torch

#: name -> (layer, keyword arguments). ``nf4-plain``: without double quantization (no nested state).
FORMATS = {
    "nf4": ("Linear4bit", {"quant_type": "nf4", "compress_statistics": True}),
    "nf4-plain": ("Linear4bit", {"quant_type": "nf4", "compress_statistics": False}),
    "fp4": ("Linear4bit", {"quant_type": "fp4", "compress_statistics": True}),
    "int8": ("Linear8bitLt", {"has_fp16_weights": False}),
}


def quantize_linears(module: torch.nn.Module, fmt: str, device: str = "cpu") -> int:
    """Replace every ``nn.Linear`` under ``module`` by the bitsandbytes layer of format ``fmt``, with the same
    weights, quantized on ``device`` (where it then lies); returns how many were replaced."""
    import bitsandbytes as bnb

    layer, options = FORMATS[fmt]
    replaced = 0
    for child in list(module.modules()):
        for name, old in list(child.named_children()):
            if type(old) is not torch.nn.Linear:
                continue
            new = getattr(bnb.nn, layer)(old.in_features, old.out_features, bias=old.bias is not None, **options)
            if layer == "Linear4bit":
                new.compute_dtype = old.weight.dtype
                # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its CPU kernel at the first
                # forward; a GPU never does, and offload refuses it. Keep the layout the GPU kernels read.
                new.support_avx512bf16_for_cpu = False
            new.load_state_dict(old.state_dict())
            setattr(child, name, new.to(device))  # quantizes on the move
            replaced += 1
    return replaced


def quant_state_bytes(module: torch.nn.Module) -> int:
    """Bytes of the quantization state the layers under ``module`` read beside their weights: ``Params4bit``'s
    absmax, code and nested state, ``Int8Params``' SCB (on the parameter or in the layer's state)."""
    total = 0
    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        kind = type(weight).__name__
        if kind == "Params4bit":
            state = weight.quant_state
            tensors = [state.absmax, state.code]
            if state.nested:
                tensors += [state.offset, state.state2.absmax, state.state2.code]
        elif kind == "Int8Params":
            tensors = [weight.SCB if weight.SCB is not None else layer.state.SCB]
        else:
            continue
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def quant_tensors(layer: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor ``layer``'s forward reads for its weight: the data and its quantization state."""
    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        state = weight.quant_state
        found = [weight.data, state.absmax, state.code]
        return found + ([state.offset, state.state2.absmax, state.state2.code] if state.nested else [])
    scb = weight.SCB if weight.SCB is not None else layer.state.SCB
    return [weight.data, scb] + ([layer.state.CB] if layer.state.CB is not None else [])
