"""Fixtures for the server tests (the fakes live in server_fakes.py)."""

from __future__ import annotations

import pytest
import torch
from server_fakes import FakePipeline


@pytest.fixture
def fake_pipeline() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
def oom_error() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.fixture(scope="session")
def demo_pipeline():
    from vramferry.pipelines.demo import build_demo_pipeline

    return build_demo_pipeline()
