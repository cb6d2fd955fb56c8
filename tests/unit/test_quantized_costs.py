"""What the cost model expects of quantized DiTs before their blocks are measured: slower matmuls where the weights
are dequantized per matmul, 16-bit activations whatever the storage dtype, and the dequantization's workspace."""

from __future__ import annotations

import dataclasses

import pytest

from vramferry.discovery.inventory import Inventory
from vramferry.planning.archs import ARCHS
from vramferry.planning.costmodel import (
    DEQUANTIZED_BYTES_PER_ELEMENT,
    FORMAT_BLOCK_FACTORS,
    dit_activation_bytes,
    dit_shape_of,
    estimated_block_times,
)
from vramferry.planning.costmodel import _part as part_cost
from vramferry.planning.devices import PRESETS
from vramferry.planning.workload import Workload

H200 = PRESETS["h200"]


def _fp8(inventory: Inventory) -> Inventory:
    """The same pipeline with its transformer quantized to fp8 weight-only (half the bytes)."""
    components = []
    for size in inventory.components:
        if size.role == "dit":
            size = dataclasses.replace(
                size,
                bytes=size.bytes // 2,
                block_bytes=tuple(b // 2 for b in size.block_bytes),
                dtype="torch.float8_e4m3fn",
                formats=("Float8Tensor weight-only",),
                shape=dataclasses.replace(
                    size.shape,
                    text_bytes=tuple(b // 2 for b in size.shape.text_bytes),
                    mod_bytes=tuple(b // 2 for b in size.shape.mod_bytes),
                ),
            )
        components.append(size)
    return dataclasses.replace(inventory, components=tuple(components))


def test_fp8_weight_only_blocks_are_expected_slower_than_bf16_ones():
    bf16 = ARCHS["flux1-dev"].inventory().get("transformer")
    fp8 = _fp8(ARCHS["flux1-dev"].inventory()).get("transformer")
    work = Workload()
    slow, fast = estimated_block_times(fp8, work, H200), estimated_block_times(bf16, work, H200)
    assert sum(slow) == pytest.approx(FORMAT_BLOCK_FACTORS["Float8Tensor weight-only"] * sum(fast), rel=0.02)


def test_quantized_activations_are_counted_in_16_bits_with_the_dequantization_workspace():
    bf16 = ARCHS["flux1-dev"].inventory().get("transformer")
    fp8 = _fp8(ARCHS["flux1-dev"].inventory()).get("transformer")
    work = Workload()
    shape = dit_shape_of(bf16)
    workspace = DEQUANTIZED_BYTES_PER_ELEMENT * (shape.hidden_size + shape.ffn) * shape.hidden_size
    assert part_cost(fp8, 28, H200, work).act == dit_activation_bytes(shape, work, 2) + workspace
    assert part_cost(bf16, 28, H200, work).act == dit_activation_bytes(shape, work, 2)
