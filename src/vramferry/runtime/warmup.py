"""Warming the device's kernels while the host store fills.

A process's first request pays once for what CUDA sets up lazily: the cuBLAS and cuDNN handles and their
heuristics, each kernel's code (read from the libraries on disk when the page cache is cold) and the caching
allocator's first blocks. Measured on a FLUX.1-sized pipeline, that is about 1 s with the libraries in the page
cache and 3 s without, against a 5 s request. While the store fills from disk the device has nothing else to do,
so :class:`Warmup` runs, on a thread of its own, each distinct layer of the pipeline once on the device, on
scratch weights (never the pipeline's own) of the same shapes and dtypes: its linear layers at the request's
token counts, its convolutions at the latent size, its norms, embeddings, attention and activations.

The warm-up never holds more than ``limit`` bytes at once (a layer that needs more is skipped), frees what it
allocated when it ends, and stops at its first error: it only makes the first request faster.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..discovery.modules import PipelineModules, Role
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
        size = torch.empty((), dtype=self.dtype).element_size()
        return size * _elements(self)


def pipeline_ops(modules: PipelineModules, workload: Workload) -> list[Op]:
    """The distinct layer calls of ``modules``' components at ``workload``'s shape, in the order found."""
    found: dict[Op, None] = {}
    latent = _latent_size(workload)
    for component in modules.components():
        tokens = _token_counts(component.role, workload)
        dtype = _first_dtype(component.module)
        if dtype is None:
            continue
        for module in component.module.modules():
            for op in _ops_of(module, tokens, latent, dtype):
                found.setdefault(op)
        # Activations written as functions rather than modules (diffusers' GELU, AdaLayerNorm's SiLU), and the
        # softmax of attention written out by hand.
        for name, approximate in (("gelu", "tanh"), ("gelu", "none"), ("silu", "none")):
            found.setdefault(Op("activation", (name, approximate, max(tokens)), dtype))
        found.setdefault(Op("softmax", (max(tokens), _ELEMENTWISE_WIDTH), dtype))
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
            logger.info("vramferry: kernel warm-up stopped early: %s", _one_line(self.error))
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

        On the default stream, as the first request's own layers run: cuBLAS keeps a workspace per stream, and
        the one made here is then the request's."""
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
    make = _Scratch(device, op.dtype)
    shape = op.shape
    if op.kind == "linear":
        rows, inner, outer, bias = shape
        return F.linear(make(rows, inner), make(outer, inner), make(outer) if bias else None)
    if op.kind == "conv":
        dims, inputs, outputs, kernel, stride, padding, dilation, groups, bias, size = shape
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        x = make(1, inputs, *size)
        w = make(outputs, inputs // groups, *kernel)
        return conv(x, w, make(outputs) if bias else None, stride, padding, dilation, groups)
    if op.kind == "layer_norm":
        rows, normalized, affine = shape
        w, b = (make(*normalized), make(*normalized)) if affine else (None, None)
        return F.layer_norm(make(rows, *normalized), normalized, w, b)
    if op.kind == "group_norm":
        groups, channels, affine, size = shape
        w, b = (make(channels), make(channels)) if affine else (None, None)
        return F.group_norm(make(1, channels, *size), groups, w, b)
    if op.kind == "rms_norm":
        rows, normalized, affine = shape
        return F.rms_norm(make(rows, *normalized), normalized, make(*normalized) if affine else None)
    if op.kind == "embedding":
        rows, dim = shape
        ids = torch.randint(0, _EMBEDDING_ROWS, (rows,), device=device)
        return F.embedding(ids, make(_EMBEDDING_ROWS, dim))
    if op.kind == "attention":
        heads, length, head_dim, causal = shape
        q = make(1, heads, length, head_dim)
        return F.scaled_dot_product_attention(q, q, q, is_causal=causal)
    if op.kind == "activation":
        name, approximate, rows = shape
        x = make(rows, _ELEMENTWISE_WIDTH)
        return F.gelu(x, approximate=approximate) if name == "gelu" else _ACTIVATIONS[name](x)
    if op.kind == "softmax":
        rows, width = shape
        return torch.softmax(make(rows, width).float(), dim=-1).to(op.dtype)
    raise ValueError(f"unknown warm-up op {op.kind!r}")


_ACTIVATIONS = {
    "silu": F.silu,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "mish": F.mish,
}


class _Scratch:
    """Uninitialised tensors of one dtype on one device: their values never matter, only their shapes."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    def __call__(self, *shape: int) -> torch.Tensor:
        return torch.empty(shape, device=self.device, dtype=self.dtype).normal_()


def _ops_of(
    module: nn.Module, tokens: tuple[int, ...], latent: tuple[int, int], dtype: torch.dtype
) -> Iterable[Op]:
    """``module``'s own calls (not its children's); ``dtype``: the component's, for layers without weights."""
    weight = _plain_weight(module)
    if isinstance(module, nn.Linear) and weight is not None:
        for rows in tokens:
            yield Op(
                "linear",
                (rows, module.in_features, module.out_features, module.bias is not None),
                weight.dtype,
            )
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and weight is not None:
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return
        dims = len(module.kernel_size)
        spatial = [
            max(side, k * s)
            for side, k, s in zip(_spatial(latent, dims), module.kernel_size, module.stride, strict=True)
        ]
        yield Op(
            "conv",
            (
                dims,
                module.in_channels,
                module.out_channels,
                tuple(module.kernel_size),
                tuple(module.stride),
                tuple(module.padding),
                tuple(module.dilation),
                module.groups,
                module.bias is not None,
                tuple(spatial),
            ),
            weight.dtype,
        )
    elif isinstance(module, nn.LayerNorm) and (weight is not None or not module.elementwise_affine):
        for rows in tokens:
            yield Op(
                "layer_norm",
                (rows, tuple(module.normalized_shape), module.elementwise_affine),
                weight.dtype if weight is not None else dtype,
            )
    elif isinstance(module, nn.GroupNorm) and weight is not None:
        yield Op("group_norm", (module.num_groups, module.num_channels, module.affine, latent), weight.dtype)
    elif isinstance(module, nn.RMSNorm) and weight is not None:
        for rows in tokens:
            yield Op("rms_norm", (rows, tuple(module.normalized_shape), True), weight.dtype)
    elif isinstance(module, nn.Embedding) and weight is not None:
        yield Op("embedding", (max(tokens), module.embedding_dim), weight.dtype)
    elif isinstance(module, (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish)):
        name = type(module).__name__.lower()
        yield Op("activation", (name, getattr(module, "approximate", "none"), max(tokens)), dtype)
    heads = _attention_heads(module, dtype)
    if heads is not None:
        count, head_dim, attention_dtype = heads
        for length in tokens:
            yield Op("attention", (count, length, head_dim, False), attention_dtype)


def _attention_heads(module: nn.Module, dtype: torch.dtype) -> tuple[int, int, torch.dtype] | None:
    """(heads, head dim, dtype) of an attention layer: diffusers' (``heads`` and a ``to_q`` projection) or
    transformers' (``num_heads`` and ``head_dim``), else ``None``."""
    heads = getattr(module, "heads", None)
    to_q = getattr(module, "to_q", None)
    if isinstance(heads, int) and heads > 0 and isinstance(to_q, nn.Linear):
        weight = _plain_weight(to_q)
        if weight is not None and to_q.out_features % heads == 0:
            return heads, to_q.out_features // heads, weight.dtype
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
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


def _elements(op: Op) -> int:
    shape = op.shape
    if op.kind == "linear":
        rows, inner, outer, _bias = shape
        return rows * inner + inner * outer + rows * outer + outer
    if op.kind == "conv":
        dims, inputs, outputs, kernel, stride, padding, dilation, groups, _bias, size = shape
        pixels = _product(size)
        return inputs * pixels + outputs * (inputs // groups) * _product(kernel) + outputs * pixels
    if op.kind in ("layer_norm", "rms_norm"):
        rows, normalized, _affine = shape
        return 2 * rows * _product(normalized) + 2 * _product(normalized)
    if op.kind == "group_norm":
        _groups, channels, _affine, size = shape
        return 2 * channels * _product(size) + 2 * channels
    if op.kind == "embedding":
        rows, dim = shape
        return _EMBEDDING_ROWS * dim + rows * dim + rows * 4
    if op.kind == "attention":
        heads, length, head_dim, _causal = shape
        # Beyond a head size of 256 no fused kernel applies: the scores are materialised, in float32.
        scores = heads * length * length * 2 if head_dim > 256 else 0
        return 4 * heads * length * head_dim + scores
    if op.kind == "activation":
        return 2 * shape[2] * _ELEMENTWISE_WIDTH
    if op.kind == "softmax":
        rows, width = shape
        return 5 * rows * width  # the input, its float32 copy and the result
    return 0


def _product(values: Iterable[int]) -> int:
    total = 1
    for value in values:
        total *= value
    return total


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
