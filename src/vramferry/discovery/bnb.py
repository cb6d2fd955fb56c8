"""bitsandbytes' quantized parameters, whose layers read tensors kept beside the weight.

A ``Params4bit`` (``Linear4bit``, nf4 or fp4) holds its packed 4-bit data; the absmax per block, the code book
and, with double quantization, the offset and the nested absmax and code live in its ``quant_state``. An
``Int8Params`` (``Linear8bitLt``) holds its int8 rows; the row scales ``SCB`` live on the parameter until the
layer first runs, then in the layer's ``MatmulLtState`` (which also points ``CB`` at the data). The host store
moves these tensors with the data: :func:`state_tensors` reads them, :func:`bind_state` points every holder at
another copy (the same ``QuantState`` and ``MatmulLtState`` objects, as ``QuantState.to`` does), and
:func:`refusal` names the layouts it cannot move.

bitsandbytes is never imported here: the types are recognised by name, so importing vramferry costs nothing
where it is not installed.
"""

from __future__ import annotations

import torch
from torch import nn

from .leaves import Held

#: The quantized parameter types, by class name, and the layer that reads each.
KINDS = {"Params4bit": "Linear4bit", "Int8Params": "Linear8bitLt"}


def kind_of(tensor: object) -> str | None:
    """``"Params4bit"`` or ``"Int8Params"`` for a bitsandbytes parameter, else ``None``."""
    cls = type(tensor)
    if cls.__name__ in KINDS and cls.__module__.startswith("bitsandbytes"):
        return cls.__name__
    return None


def state_tensors(param: torch.Tensor, module: nn.Module | None) -> dict[str, torch.Tensor]:
    """The tensors ``param``'s layer reads besides its data, by name, in a fixed order.

    Args:
        param: a ``Params4bit`` or ``Int8Params``.
        module: the layer registering it (where ``Linear8bitLt`` keeps ``SCB`` once it has run).
    """
    if kind_of(param) == "Params4bit":
        state = param.quant_state
        if state is None:
            return {}
        found = {"absmax": state.absmax, "code": state.code}
        if state.nested:
            found.update(
                {"offset": state.offset, "state2.absmax": state.state2.absmax, "state2.code": state.state2.code}
            )
        return found
    scb = getattr(param, "SCB", None)
    if scb is None and module is not None and getattr(module, "state", None) is not None:
        scb = module.state.SCB
    return {"SCB": scb} if scb is not None else {}


def bind_state(param: torch.Tensor, modules: list[nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Point every holder of ``param``'s state at ``state`` (tensors named as :func:`state_tensors` names them);
    ``param.data`` is the caller's to set. Holders keep their identity: the same ``QuantState`` (which
    ``Linear4bit.quant_state`` shares) and the same ``MatmulLtState``."""
    if kind_of(param) == "Params4bit":
        quant = param.quant_state
        quant.absmax, quant.code = state["absmax"], state["code"]
        if "offset" in state:
            quant.offset = state["offset"]
            quant.state2.absmax, quant.state2.code = state["state2.absmax"], state["state2.code"]
        return
    # Int8Params: SCB wherever it is held now. The layer's first forward moves it (and CB) from the parameter
    # to its MatmulLtState; CB is the data itself, so it follows the data.
    if getattr(param, "SCB", None) is not None:
        param.SCB = state["SCB"]
        if param.CB is not None:
            param.CB = param.data
    for module in modules:
        held = getattr(module, "state", None)
        if held is not None and getattr(module, "weight", None) is param and held.SCB is not None:
            held.SCB = state["SCB"]
            if held.CB is not None:
                held.CB = param.data


def format_of(param: torch.Tensor) -> str:
    """The format shown for ``param``: ``"Params4bit nf4"``, ``"Params4bit fp4"`` or ``"Int8Params"``."""
    if kind_of(param) == "Params4bit":
        return f"Params4bit {param.quant_type}"
    return "Int8Params"


def refusal(param: torch.Tensor, module: nn.Module, device: torch.device) -> str | None:
    """Why the host store cannot move ``param`` (registered by ``module``) for a layer run on ``device``, with
    what to do instead; ``None`` when it can."""
    kind = kind_of(param)
    if kind == "Params4bit":
        state = param.quant_state
        if not param.bnb_quantized or state is None:
            return (
                "is not quantized yet (bitsandbytes quantizes on the first move to a device): move the component "
                "to the device once, or load it with diffusers' BitsAndBytesConfig, before applying offload"
            )
        if getattr(state, "packing_format_for_cpu", False):
            return (
                "was repacked for bitsandbytes' CPU kernel by a forward on the CPU (a layout the GPU kernels do "
                "not read): reload the component, or set support_avx512bf16_for_cpu = False on its Linear4bit "
                "layers before they first run on the CPU"
            )
        if device.type == "cpu" and getattr(module, "support_avx512bf16_for_cpu", False):
            return (
                "would be repacked for bitsandbytes' CPU kernel by its first forward on the CPU, replacing the "
                "weight the host store holds: set support_avx512bf16_for_cpu = False on its Linear4bit layers, "
                "or run on a GPU"
            )
        return None
    state = getattr(module, "state", None)
    if param.dtype != torch.int8 or param.has_fp16_weights or (state is not None and state.has_fp16_weights):
        return (
            "holds training weights (has_fp16_weights=True, or not quantized yet): the layer quantizes them anew "
            "at every forward into state the host store cannot keep. Build the layer with "
            "has_fp16_weights=False and move it to the device once (or load with BitsAndBytesConfig("
            "load_in_8bit=True)) before applying offload"
        )
    if not state_tensors(param, module):
        return "has no row scales (SCB) on the parameter or in its layer's state: quantize it before applying offload"
    return None


def held_of(tensor: torch.Tensor, module: nn.Module | None) -> torch.Tensor | Held:
    """``tensor`` as the host store reads it: a bitsandbytes parameter with its state as a :class:`Held`, any
    other tensor as it is."""
    if kind_of(tensor) is None:
        return tensor
    return Held(tensor.data, state_tensors(tensor, module))
