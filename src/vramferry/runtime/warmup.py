"""Warming the device's kernels while the host store fills.

A process's first request pays once for what CUDA sets up lazily: the cuBLAS and cuDNN handles and their
heuristics, each kernel's code (read from the libraries on disk when the page cache is cold) and the caching
allocator's first blocks. On a FLUX.1-sized pipeline that is seconds against a request of a few, most of it when
the libraries are out of the page cache. While the store fills from disk the device has nothing else to do, so
:class:`Warmup` runs, on a thread of its own, each distinct layer of the pipeline once on the device, on scratch
weights (never the pipeline's own) of the same shapes and dtypes: its linear layers at the request's token
counts, its convolutions at the latent size, its norms (those computed in float32 too), embeddings, attention (the
text encoders' with an additive mask) and activations, and once per dtype the elementwise, reduction, indexing
and resampling kernels that layers call between them (a kernel is loaded on its first launch whatever its shape).

The warm-up never holds more than ``limit`` bytes at once (a layer that needs more is skipped), frees what it
allocated when it ends, and stops at its first error: it only makes the first request faster.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..discovery.modules import PipelineModules, Role
from ..errors import one_line
from ..planning.workload import Workload

logger = logging.getLogger(__name__)

#: Scratch bytes a warm-up may hold at once when the plan sets no activation estimate.
DEFAULT_LIMIT = 512 * 2**20

#: The dtypes a warm-up runs layers in (quantized and integer weights are left to the first request).
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

#: Rows of the embedding tables warmed: the lookup kernel does not depend on the table's length.
_EMBEDDING_ROWS = 1024

#: Width of the tensors activations and softmax are warmed on.
_ELEMENTWISE_WIDTH = 1024

#: Rows the elementwise kernels are warmed on: which kernel runs does not depend on the row count.
_POINTWISE_ROWS = 512

#: CLIP-style text encoders pad to this many tokens, T5-style ones to the workload's ``text_tokens``.
_SHORT_PROMPT = 77


@dataclass(frozen=True)
class Op:
    """One layer call to warm: ``kind`` (``linear``, ``conv``, ``layer_norm``, ``group_norm``, ``rms_norm``,
    ``embedding``, ``attention``, ``activation``, ``softmax``), its shape arguments and dtype."""

    kind: str
    shape: tuple
    dtype: torch.dtype

    def nbytes(self) -> int:
        """Scratch bytes its call holds at once: inputs, weights and output."""
        return self.dtype.itemsize * _kind(self).elements(self.shape)


def pipeline_ops(modules: PipelineModules, workload: Workload) -> list[Op]:
    """The distinct layer calls of ``modules``' components at ``workload``'s shape, in the order found."""
    found: dict[Op, None] = {}
    for component in modules.components():
        tokens = _token_counts(component.role, workload)
        dtype = _first_dtype(component.module)
        if dtype is None:
            continue
        at = _Shapes(tokens, _latent_size(workload), dtype, masked=component.role is Role.ENCODER)
        for module in component.module.modules():
            for op in _ops_of(module, at):
                found.setdefault(op)
        # Activations written as functions rather than modules (diffusers' GELU, AdaLayerNorm's SiLU), the
        # softmax of attention written out by hand, and the elementwise work between layers.
        for name, approximate in (("gelu", "tanh"), ("gelu", "none"), ("silu", "none")):
            found.setdefault(Op("activation", (name, approximate, max(tokens)), dtype))
        found.setdefault(Op("softmax", (max(tokens), _ELEMENTWISE_WIDTH), dtype))
        # float32 and float64: norms, the embeddings of positions (rotary ones in float64) and of timesteps.
        for kind in (dtype, torch.float32, torch.float64):
            found.setdefault(Op("pointwise", (_POINTWISE_ROWS, _ELEMENTWISE_WIDTH), kind))
    return list(found)


class Warmup:
    """Runs ``ops`` once each on ``device``, on a thread of its own (:meth:`start`, :meth:`join`).

    Args:
        ops: the layer calls (:func:`pipeline_ops`).
        device: a CUDA device.
        limit: most scratch bytes one call may hold; larger calls are skipped.
    """

    def __init__(self, ops: list[Op], device: torch.device, limit: int = DEFAULT_LIMIT) -> None:
        self.ops = ops
        self.device = device
        self.limit = limit
        self.ran: list[Op] = []
        self.skipped: list[Op] = []
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> Warmup:
        self._thread = threading.Thread(target=self.run, name="vramferry-warmup", daemon=True)
        self._thread.start()
        return self

    def join(self) -> float:
        """Wait for the warm-up to end and free its scratch memory; returns its seconds."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.device.type == "cuda" and self.ran:
            torch.cuda.empty_cache()  # the scratch blocks the allocator kept go back to the device
        if self.error is not None:
            logger.info("vramferry: kernel warm-up stopped early: %s", one_line(self.error))
        logger.info(
            "vramferry: kernel warm-up: %d layer calls in %.2f s (%d skipped, over %.2f GB)",
            len(self.ran),
            self.seconds,
            len(self.skipped),
            self.limit / 1e9,
        )
        return self.seconds

    def run(self) -> None:
        """Run every op that fits the limit, in order (on the calling thread).

        On the default stream, the one the first request's layers run on: cuBLAS keeps a workspace per stream,
        and a stream of the warm-up's own would keep one more for good."""
        start = time.perf_counter()
        try:
            with torch.no_grad():
                for op in self.ops:
                    if op.nbytes() > self.limit:
                        self.skipped.append(op)
                        continue
                    run_op(op, self.device)
                    self.ran.append(op)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        except Exception as exc:  # a warm-up that fails only leaves the first request as it was
            self.error = exc
        self.seconds = time.perf_counter() - start


def run_op(op: Op, device: torch.device) -> torch.Tensor:
    """Call ``op`` once on scratch tensors on ``device``; returns its output."""
    return _kind(op).run(op.shape, _Scratch(device, op.dtype))


class _Scratch:
    """Tensors of one dtype on one device, filled with normal noise: their values never matter, only their
    shapes (noise rather than uninitialised memory, whose NaNs and denormals some kernels run slower on)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    def __call__(self, *shape: int) -> torch.Tensor:
        return torch.empty(shape, device=self.device, dtype=self.dtype).normal_()


@dataclass(frozen=True)
class _Kind:
    """How to call one kind of op on scratch tensors, and how many elements that call holds at once."""

    run: Callable[[tuple, _Scratch], torch.Tensor]
    elements: Callable[[tuple], int]


def _linear(shape: tuple, make: _Scratch) -> torch.Tensor:
    rows, inner, outer, bias = shape
    return F.linear(make(rows, inner), make(outer, inner), make(outer) if bias else None)


def _linear_elements(shape: tuple) -> int:
    rows, inner, outer, _bias = shape
    return rows * inner + inner * outer + rows * outer + outer


_CONVS = (F.conv1d, F.conv2d, F.conv3d)


def _conv(shape: tuple, make: _Scratch) -> torch.Tensor:
    dims, inputs, outputs, kernel, stride, padding, dilation, groups, bias, size = shape
    weight = make(outputs, inputs // groups, *kernel)
    return _CONVS[dims - 1](
        make(1, inputs, *size), weight, make(outputs) if bias else None, stride, padding, dilation, groups
    )


def _conv_elements(shape: tuple) -> int:
    _dims, inputs, outputs, kernel, _stride, _padding, _dilation, groups, _bias, size = shape
    pixels = math.prod(size)
    return inputs * pixels + outputs * (inputs // groups) * math.prod(kernel) + outputs * pixels


def _layer_norm(shape: tuple, make: _Scratch) -> torch.Tensor:
    rows, normalized, affine = shape
    weight, bias = (make(*normalized), make(*normalized)) if affine else (None, None)
    return F.layer_norm(make(rows, *normalized), normalized, weight, bias)


def _rms_norm(shape: tuple, make: _Scratch) -> torch.Tensor:
    rows, normalized, affine = shape
    return F.rms_norm(make(rows, *normalized), normalized, make(*normalized) if affine else None)


def _norm_elements(shape: tuple) -> int:
    rows, normalized, _affine = shape
    return 2 * rows * math.prod(normalized) + 2 * math.prod(normalized)


def _group_norm(shape: tuple, make: _Scratch) -> torch.Tensor:
    groups, channels, affine, size = shape
    weight, bias = (make(channels), make(channels)) if affine else (None, None)
    return F.group_norm(make(1, channels, *size), groups, weight, bias)


def _group_norm_elements(shape: tuple) -> int:
    _groups, channels, _affine, size = shape
    return 2 * channels * math.prod(size) + 2 * channels


def _embedding(shape: tuple, make: _Scratch) -> torch.Tensor:
    rows, dim = shape
    ids = torch.randint(0, _EMBEDDING_ROWS, (rows,), device=make.device)
    return F.embedding(ids, make(_EMBEDDING_ROWS, dim))


def _embedding_elements(shape: tuple) -> int:
    rows, dim = shape
    return _EMBEDDING_ROWS * dim + rows * dim + rows * 4  # the table, the rows looked up, the int64 ids


#: Additive attention masks: none, one for every head (CLIP's causal and padding mask), one per head (T5's
#: position bias). Each is a different fused kernel, or plan, from the others.
_MASK_HEADS = {"none": 0, "shared": 1, "per_head": None}


def _attention(shape: tuple, make: _Scratch) -> torch.Tensor:
    heads, length, head_dim, causal, mask = shape
    q = make(1, heads, length, head_dim)
    mask_heads = _MASK_HEADS[mask] if _MASK_HEADS[mask] is not None else heads
    bias = make(1, mask_heads, length, length) if mask_heads else None
    return F.scaled_dot_product_attention(q, q, q, attn_mask=bias, is_causal=causal)


def _attention_elements(shape: tuple) -> int:
    heads, length, head_dim, _causal, mask = shape
    # Beyond a head size of 256 no fused kernel applies: the scores are materialised, in float32.
    scores = heads * length * length * 2 if head_dim > 256 else 0
    bias = (_MASK_HEADS[mask] if _MASK_HEADS[mask] is not None else heads) * length * length
    return 4 * heads * length * head_dim + scores + bias


def _rms_norm_float32(shape: tuple, make: _Scratch) -> torch.Tensor:
    """An RMS norm as transformers writes it (T5's, Llama's): the variance in float32, scaled, cast back."""
    rows, width = shape
    x, weight = make(rows, width), make(width)
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + 1e-6)).to(weight.dtype)


def _pointwise(shape: tuple, make: _Scratch) -> torch.Tensor:
    """The elementwise, reduction, indexing and resampling calls between layers, in ``make``'s dtype: on whole
    tensors, broadcast rows and columns and Python numbers (each its own kernel); conversions to and from it; and
    the integer arithmetic of token ids, position ids and relative position buckets (CLIP's, T5's)."""
    rows, width = shape
    x, y, row, col = make(rows, width), make(rows, width), make(1, width), make(rows, 1)
    out = [x + y, x - row, x * col, x / y, -x, torch.exp(x), torch.log(x.abs() + 1), torch.sin(x), torch.cos(x)]
    out += [x + 0.5, x * 0.5, x / 3.0, x * 2, x / 3, x - 1, torch.pow(x, 2), torch.pow(2.0, x), x.reciprocal()]
    out += [torch.maximum(x, y), torch.minimum(x, row), x.clamp(-1, 1), torch.where(x > y, x, y)]
    out += [torch.rsqrt(x.abs() + 1), x.mean(-1, keepdim=True), x.sum(0, keepdim=True), torch.zeros_like(x), x.abs()]
    out += [torch.cat([x, y], -1)[:, :width], torch.stack([x, y])[0], x.repeat_interleave(2, dim=0)[:rows]]
    out += [x.repeat(2, 1)[:rows], x.unfold(1, 2, 2).sum(-1)[:, :1], (x + y.float()).to(x.dtype)]
    out += [torch.outer(x[0], y[0]).sum(0, keepdim=True), torch.outer(x[0], y[0].float()).to(x.dtype)[:1]]
    out += [F.interpolate(x[None, None], scale_factor=2.0, mode="nearest")[0, 0, ::2, ::2]]
    mask = (x > 0) & ~(y > 0)
    out += [x.masked_fill(mask, 0), F.pad(x, (1, 1))[:, 1:-1], torch.sqrt(x.abs()), torch.tanh(x), mask.sum(-1, True)]
    if x.dtype in (torch.float32, torch.float64):  # rotary embeddings written with complex numbers (Qwen's)
        pairs = torch.view_as_complex(x[:, : width // 2 * 2].reshape(rows, -1, 2).contiguous())
        out.append(torch.view_as_real(pairs * pairs).reshape(rows, -1)[:, :1])
    for kind in (torch.float32, torch.bfloat16, torch.float64, torch.long):
        out.append(x.to(kind).to(x.dtype))
    x.add_(y)
    ids = torch.arange(rows, device=make.device)
    tokens = (ids + 0).add_(1).to(torch.int32) * (ids > 0).to(torch.int32)
    positions = torch.arange(width, device=make.device, dtype=x.dtype)[None, :]
    first = ((tokens == 0).to(torch.long) + tokens.argmax(-1))[:, None] + positions
    relative = ids[None, :] - ids[:, None] + 1
    out.append(((relative >= 0) & (relative <= 1)).sum(-1, keepdim=True)[:, :1].to(x.dtype))
    distance = relative.abs()
    large = 8 + (torch.log(distance.float() / 8) / 2.77 * 8).to(torch.long)
    large = torch.min(large, torch.full_like(large, 15))
    buckets = (relative > 0).to(torch.long) * 16 + torch.where(distance < 8, distance, large)
    picked = x[buckets[0].clamp(0, rows - 1)] + x.argmax(-1, keepdim=True).to(x.dtype) * (ids[:, None] == 0)
    return sum(out[1:], out[0]) + picked + first


def _rms_norm_float32_elements(shape: tuple) -> int:
    rows, width = shape
    return 4 * rows * width + width  # the input, its float32 copy (two elements' worth) and the result


def _pointwise_elements(shape: tuple) -> int:
    rows, width = shape
    return 48 * rows * width + 24 * rows * rows  # the results held at once; the int64 index arithmetic


_ACTIVATIONS = {
    "silu": F.silu,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "mish": F.mish,
}


def _activation(shape: tuple, make: _Scratch) -> torch.Tensor:
    name, approximate, rows = shape
    x = make(rows, _ELEMENTWISE_WIDTH)
    return F.gelu(x, approximate=approximate) if name == "gelu" else _ACTIVATIONS[name](x)


def _softmax(shape: tuple, make: _Scratch) -> torch.Tensor:
    rows, width = shape
    return torch.softmax(make(rows, width).float(), dim=-1).to(make.dtype)


_KINDS: dict[str, _Kind] = {
    "linear": _Kind(_linear, _linear_elements),
    "conv": _Kind(_conv, _conv_elements),
    "layer_norm": _Kind(_layer_norm, _norm_elements),
    "rms_norm": _Kind(_rms_norm, _norm_elements),
    "group_norm": _Kind(_group_norm, _group_norm_elements),
    "embedding": _Kind(_embedding, _embedding_elements),
    "attention": _Kind(_attention, _attention_elements),
    "rms_norm_float32": _Kind(_rms_norm_float32, _rms_norm_float32_elements),
    "pointwise": _Kind(_pointwise, _pointwise_elements),
    "activation": _Kind(_activation, lambda shape: 2 * shape[2] * _ELEMENTWISE_WIDTH),
    # the input, its float32 copy and the result
    "softmax": _Kind(_softmax, lambda shape: 5 * shape[0] * shape[1]),
}


def _kind(op: Op) -> _Kind:
    kind = _KINDS.get(op.kind)
    if kind is None:
        raise ValueError(f"unknown warm-up op {op.kind!r}; known: {', '.join(_KINDS)}")
    return kind


@dataclass(frozen=True)
class _Shapes:
    """What a component's layers see in one call: the rows of their inputs, the latent size, the component's
    dtype (for layers without weights of their own)."""

    tokens: tuple[int, ...]
    latent: tuple[int, int]
    dtype: torch.dtype
    masked: bool = False  # its attention takes an additive mask (text encoders)


def _ops_of(module: nn.Module, at: _Shapes) -> Iterable[Op]:
    """``module``'s own calls (not its children's)."""
    weight = _plain_weight(module)
    layer = next((_LAYERS[cls] for cls in type(module).__mro__ if cls in _LAYERS), None)
    if layer is not None:
        yield from layer(module, weight, at)
    elif weight is not None and weight.dim() == 1 and hasattr(module, "variance_epsilon"):
        for rows in at.tokens:  # transformers' RMS norms (T5LayerNorm, LlamaRMSNorm...), in float32 inside
            yield Op("rms_norm_float32", (rows, weight.shape[0]), weight.dtype)
    heads = _attention_heads(module, at.dtype)
    if heads is not None:
        count, head_dim, dtype = heads
        for length in at.tokens:
            for mask in ("shared", "per_head") if at.masked else ("none",):
                yield Op("attention", (count, length, head_dim, False, mask), dtype)


def _linear_ops(module: nn.Linear, weight: torch.Tensor | None, at: _Shapes) -> Iterable[Op]:
    if weight is None:
        return
    for rows in at.tokens:
        yield Op(
            "linear", (rows, module.in_features, module.out_features, module.bias is not None), weight.dtype
        )


def _conv_ops(module: nn.Module, weight: torch.Tensor | None, at: _Shapes) -> Iterable[Op]:
    if weight is None or isinstance(module.padding, str) or module.padding_mode != "zeros":
        return
    dims = len(module.kernel_size)
    # At the latent size, and never smaller than what one step of the kernel covers.
    size = tuple(
        max(side, k * s)
        for side, k, s in zip(_spatial(at.latent, dims), module.kernel_size, module.stride, strict=True)
    )
    shape = (
        dims,
        module.in_channels,
        module.out_channels,
        tuple(module.kernel_size),
        tuple(module.stride),
        tuple(module.padding),
        tuple(module.dilation),
        module.groups,
        module.bias is not None,
        size,
    )
    yield Op("conv", shape, weight.dtype)


def _layer_norm_ops(module: nn.LayerNorm, weight: torch.Tensor | None, at: _Shapes) -> Iterable[Op]:
    if weight is None and module.elementwise_affine:
        return  # a quantized or integer weight
    for rows in at.tokens:
        shape = (rows, tuple(module.normalized_shape), module.elementwise_affine)
        yield Op("layer_norm", shape, weight.dtype if weight is not None else at.dtype)


def _rms_norm_ops(module: nn.RMSNorm, weight: torch.Tensor | None, at: _Shapes) -> Iterable[Op]:
    if weight is None:
        return
    for rows in at.tokens:
        yield Op("rms_norm", (rows, tuple(module.normalized_shape), True), weight.dtype)


def _group_norm_ops(module: nn.GroupNorm, weight: torch.Tensor | None, at: _Shapes) -> Iterable[Op]:
    if weight is not None:
        yield Op(
            "group_norm", (module.num_groups, module.num_channels, module.affine, at.latent), weight.dtype
        )


def _embedding_ops(module: nn.Embedding, weight: torch.Tensor | None, at: _Shapes) -> Iterable[Op]:
    if weight is not None:
        yield Op("embedding", (max(at.tokens), module.embedding_dim), weight.dtype)


def _activation_ops(module: nn.Module, _weight: torch.Tensor | None, at: _Shapes) -> Iterable[Op]:
    name = type(module).__name__.lower()
    yield Op("activation", (name, getattr(module, "approximate", "none"), max(at.tokens)), at.dtype)


#: Layer classes (matched along each module's class hierarchy) to the ops they call.
_LAYERS: dict[type, Callable[[nn.Module, torch.Tensor | None, _Shapes], Iterable[Op]]] = {
    nn.Linear: _linear_ops,
    nn.Conv1d: _conv_ops,
    nn.Conv2d: _conv_ops,
    nn.Conv3d: _conv_ops,
    nn.LayerNorm: _layer_norm_ops,
    nn.RMSNorm: _rms_norm_ops,
    nn.GroupNorm: _group_norm_ops,
    nn.Embedding: _embedding_ops,
    **{cls: _activation_ops for cls in (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish)},
}


def _attention_heads(module: nn.Module, dtype: torch.dtype) -> tuple[int, int, torch.dtype] | None:
    """(heads, head dim, dtype) of an attention layer: diffusers' (``heads`` and a ``to_q`` projection) or
    transformers' (``num_heads`` and ``head_dim``; T5's ``n_heads`` and ``key_value_proj_dim``), else ``None``."""
    heads = getattr(module, "heads", None)
    to_q = getattr(module, "to_q", None)
    if isinstance(heads, int) and heads > 0 and isinstance(to_q, nn.Linear):
        weight = _plain_weight(to_q)
        if weight is not None and to_q.out_features % heads == 0:
            return heads, to_q.out_features // heads, weight.dtype
    for names in (("num_heads", "head_dim"), ("n_heads", "key_value_proj_dim")):  # CLIP's and most; T5's
        heads, head_dim = (getattr(module, name, None) for name in names)
        if isinstance(heads, int) and isinstance(head_dim, int) and heads > 0 and head_dim > 0:
            return heads, head_dim, _first_dtype(module) or dtype
    return None


def _plain_weight(module: nn.Module) -> torch.Tensor | None:
    """The module's own ``weight`` when it is a plain floating tensor (not quantized, not a tensor subclass)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or type(weight) not in (torch.Tensor, nn.Parameter):
        return None
    if type(weight.data) is not torch.Tensor or weight.dtype not in _FLOATS:
        return None
    return weight


def _first_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the first plain floating parameter in ``module``, or ``None`` when it has none."""
    for param in module.parameters():
        if type(param.data) is torch.Tensor and param.dtype in _FLOATS:
            return param.dtype
    return None


def _token_counts(role: Role, workload: Workload) -> tuple[int, ...]:
    """The rows a component's linear layers see in one call at ``workload``."""
    batch = workload.batch
    text = max(workload.text_tokens, 1)
    if role is Role.DIT:
        image = workload.sequence_length(joint_text=False)
        counts = (text, image, image + text)
    elif role is Role.VAE:
        height, width = _latent_size(workload)
        counts = (height * width,)
    else:
        counts = (min(_SHORT_PROMPT, text), text)
    return tuple(dict.fromkeys(batch * count for count in counts))


def _latent_size(workload: Workload) -> tuple[int, int]:
    return max(workload.height // 8, 1), max(workload.width // 8, 1)


def _spatial(latent: tuple[int, int], dims: int) -> list[int]:
    if dims == 1:
        return [latent[0] * latent[1]]
    if dims == 2:
        return list(latent)
    return [1, *latent]
