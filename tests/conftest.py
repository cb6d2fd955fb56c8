"""Shared test setup: no network, a throwaway HF cache, the ``gpu`` marker, and tiny real pipelines.

The environment variables are set at import time, before anything imports diffusers, transformers or
huggingface_hub (they read them once, at import): an accidental Hub call then fails at once instead of
hanging, and any cache write lands in a temporary folder.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="vramferry-test-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = _HF_HOME

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``@pytest.mark.gpu`` when CUDA is unavailable (never pass them silently)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _pipeline_names() -> list[str]:
    from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES

    return list(DIFFUSERS_PIPELINES)


@pytest.fixture(scope="session", params=_pipeline_names())
def diffusers_pipeline(request: pytest.FixtureRequest):
    """``(name, pipe, call_kwargs)`` for every tiny pipeline; ``pipe(**call_kwargs, generator=seeded())``.

    Built once per test run and shared: a test that changes the pipeline (hooks, devices) must undo it.
    """
    pytest.importorskip("diffusers")
    from pipelines.diffusers_pipes import DIFFUSERS_PIPELINES

    pipe, call_kwargs = DIFFUSERS_PIPELINES[request.param]()
    return request.param, pipe, call_kwargs


@pytest.fixture(scope="session")
def tiny_flux():
    """``(pipe, call_kwargs)``: FluxPipeline with diffusers' test shapes (1 + 1 blocks, 32x32)."""
    pytest.importorskip("diffusers")
    from pipelines.diffusers_pipes import build_flux

    return build_flux()


@pytest.fixture(scope="session")
def flux_production():
    """``(pipe, call_kwargs)``: FluxPipeline with FLUX.1's latent layout (16 channels, 4-level VAE), 64x64."""
    pytest.importorskip("diffusers")
    from pipelines.diffusers_pipes import build_flux_production

    return build_flux_production()


@pytest.fixture(scope="session")
def demo_pipeline():
    """The built-in demo FluxPipeline (seed 0), as the CLI runs it without ``--model``."""
    pytest.importorskip("diffusers")
    from vramferry.pipelines import build_demo_pipeline

    pipe = build_demo_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def saved_flux_dir(tmp_path_factory: pytest.TempPathFactory, tiny_flux):
    """A folder written by ``save_pretrained`` from :func:`tiny_flux` (read-only for tests)."""
    pipe, _ = tiny_flux
    folder = tmp_path_factory.mktemp("saved_flux")
    pipe.save_pretrained(folder)
    return folder


_ALLOCATOR_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


@pytest.fixture(autouse=True)
def _allocator_settings_restored():
    """The CLI sets the allocator's settings for its process; in tests, each test gets the settings back."""
    saved = {name: os.environ.get(name) for name in _ALLOCATOR_VARS}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
