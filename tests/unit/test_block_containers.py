"""Blocks found in every container a DiT may keep them in, with a minority of odd blocks tolerated."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vramferry
from vramferry.discovery import discover


class _Block(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class _FinalBlock(_Block):
    """Another class at the end of the stack, as some DiTs have."""


class _DiT(nn.Module):
    def __init__(self, container: str) -> None:
        super().__init__()
        self.proj_in = nn.Linear(32, 32)
        blocks = [_Block() for _ in range(5)]
        if container == "sequential":
            self.blocks = nn.Sequential(*blocks)
        elif container == "dict":
            self.blocks = nn.ModuleDict({f"b{i}": b for i, b in enumerate(blocks)})
        else:
            self.blocks = nn.ModuleList([*blocks, _FinalBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        for block in self.blocks.values() if isinstance(self.blocks, nn.ModuleDict) else self.blocks:
            h = block(h)
        return h


class _Pipeline:
    _dit_modules = ["transformer"]
    _encoder_modules: list = []
    _vae_modules: list = []

    def __init__(self, container: str) -> None:
        torch.manual_seed(0)
        self.transformer = _DiT(container)


@pytest.mark.parametrize(
    "container, names",
    [
        ("sequential", [f"blocks.{i}" for i in range(5)]),
        ("dict", [f"blocks.b{i}" for i in range(5)]),
        ("odd_last", [f"blocks.{i}" for i in range(6)]),
    ],
)
def test_blocks_are_found_in_sequential_moduledict_and_with_an_odd_block(container, names):
    pipe = _Pipeline(container)
    found = discover(pipe, strict=True).blocks["transformer"]
    assert list(found.names) == names and found.found_by == "heuristic"
    x = torch.randn(2, 32)
    with torch.no_grad():
        expected = pipe.transformer(x)
    for mode in ("layerwise", "auto"):
        handle = vramferry.apply(
            pipe, vramferry.OffloadConfig(mode=mode, onload_device="cpu", prefetch_depth=1)
        )
        try:
            if mode == "layerwise":
                streamed = [u.name for u in handle.units() if u.kind == "block"]
                assert streamed == [f"transformer.{n}" for n in names]
            with torch.no_grad():
                assert torch.equal(pipe.transformer(x), expected)
        finally:
            handle.remove()


def test_a_sequential_of_single_layers_is_an_mlp_not_blocks():
    class _MlpDiT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 8))

        def forward(self, x):
            return self.net(x)

    pipe = _Pipeline("sequential")
    pipe.transformer = _MlpDiT()
    result = discover(pipe)
    assert "transformer" not in result.blocks
    assert "shows no repeated blocks" in result.warnings[0]
