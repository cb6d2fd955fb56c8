"""Turn ``--model`` into a diffusers pipeline: the built-in demo, a local folder, or a Hub id.

Pipelines are always loaded on the CPU; placing weights on the GPU is vramferry's job, not the loader's.
diffusers and transformers are optional extras, imported only when a pipeline is actually loaded.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..errors import LoadError, one_line
from .extras import require_extra

logger = logging.getLogger(__name__)


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
}


# A Hub id: "name" or "owner/name", letters, digits, "-", "_", "." only.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


_LISTED_ENTRIES = 8


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """Map a dtype name (``float32``, ``float16``, ``bfloat16``; also ``fp16``, ``bf16``...) to a torch dtype.

    Args:
        value: the name, with or without a ``torch.`` prefix, or a torch dtype.

    Returns:
        The torch dtype.

    Raises:
        LoadError: the name is not one of the supported dtypes.
    """
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
        raise LoadError(f"unsupported dtype {value}; valid dtypes: {', '.join(DTYPES)}")
    name = str(value).strip().lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise LoadError(f"unknown dtype {value!r}; valid dtypes: {', '.join(DTYPES)}")
    return DTYPES[name]


def load_pipeline(
    model: str | os.PathLike | None, *, dtype: str | torch.dtype | dict | None = None, variant=None
):
    """Load a diffusers pipeline on the CPU.

    Args:
        model: ``None`` for the built-in demo pipeline (random weights, no download); a local folder written
            by ``save_pretrained`` (it holds ``model_index.json``); or a Hugging Face Hub id.
        dtype: the weights' dtype (``float32``, ``float16``, ``bfloat16`` or a torch dtype); ``None`` keeps
            diffusers' default. For a folder or Hub id, also a dict from component names to dtypes, as diffusers
            takes it (``"default"`` for the others).
        variant: the weight-file variant to load (e.g. ``"fp16"``), passed through to diffusers.

    Returns:
        The pipeline, with every module on the CPU.

    Raises:
        LoadError: the folder is missing or not a diffusers pipeline, the id cannot be fetched, or the dtype
            is unknown. The message names the culprit and the fix.
    """
    if isinstance(dtype, dict):
        torch_dtype: Any = {name: parse_dtype(value) for name, value in dtype.items()}
        if model is None:
            raise LoadError("the demo pipeline takes one dtype, not one per component")
    else:
        torch_dtype = parse_dtype(dtype) if dtype is not None else None
    if model is None:
        from .demo import build_demo_pipeline

        pipe = build_demo_pipeline()
        return pipe.to(dtype=torch_dtype) if torch_dtype is not None else pipe
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        return _load_folder(path, torch_dtype, variant)
    if not _looks_like_hub_id(text):
        raise LoadError(f"model folder {text!r} does not exist")
    return _load_hub(text, torch_dtype, variant)


def _looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "~")) and ".." not in text


def _describe_folder(path: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "it is empty"
    shown = ", ".join(names[:_LISTED_ENTRIES])
    more = f" and {len(names) - _LISTED_ENTRIES} more" if len(names) > _LISTED_ENTRIES else ""
    return f"it contains {shown}{more}"


def _dtype_kwargs(diffusers: ModuleType, torch_dtype: Any, variant) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        # diffusers renamed `torch_dtype` to `dtype` (the old name still works but warns); use what it has.
        from diffusers.pipelines import pipeline_utils

        key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
        kwargs[key] = torch_dtype
    if variant is not None:
        kwargs["variant"] = variant
    return kwargs


def _load_folder(path: Path, torch_dtype: Any, variant):
    if not path.is_dir():
        raise LoadError(f"model path {str(path)!r} is a file; pass a diffusers pipeline folder")
    if not (path / "model_index.json").is_file():
        hint = (
            " (config.json alone is a single model, not a pipeline)"
            if (path / "config.json").exists()
            else ""
        )
        raise LoadError(
            f"{str(path)!r} has no model_index.json: {_describe_folder(path)}; a diffusers pipeline folder "
            f"(as written by save_pretrained) is expected{hint}"
        )
    diffusers = require_extra("diffusers")
    logger.info("loading pipeline from %s", path)
    try:
        return diffusers.DiffusionPipeline.from_pretrained(
            str(path), **_dtype_kwargs(diffusers, torch_dtype, variant)
        )
    except Exception as exc:  # any failure inside diffusers becomes one line for the user
        raise LoadError(f"could not load the pipeline in {str(path)!r}: {one_line(exc)}") from exc


def _load_hub(model_id: str, torch_dtype: Any, variant):
    diffusers = require_extra("diffusers")
    from huggingface_hub import constants

    logger.info("loading pipeline %s from the Hugging Face Hub (or its local cache)", model_id)
    try:
        return diffusers.DiffusionPipeline.from_pretrained(
            model_id, **_dtype_kwargs(diffusers, torch_dtype, variant)
        )
    except Exception as exc:  # any failure inside diffusers becomes one line for the user
        if constants.HF_HUB_OFFLINE:
            raise LoadError(
                f"{model_id!r} is not a local folder and is not in the Hugging Face cache, and the network is "
                "off (HF_HUB_OFFLINE=1); pass a local diffusers pipeline folder or enable network access"
            ) from exc
        raise LoadError(
            f"could not load {model_id!r} from the Hugging Face Hub: {one_line(exc)}; pass a local diffusers "
            "pipeline folder, or check the id and the network"
        ) from exc
