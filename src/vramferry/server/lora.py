"""LoRA adapters of a served pipeline: loading them before offload, and switching them between requests.

Adapters are loaded with diffusers' ``pipeline.load_lora_weights`` before ``vramferry.apply``, so that the host
store is packed once with them (one loaded while live is packed again at the next request). Switching weights
afterwards only changes the adapters' scales (``set_adapters``, ``disable_lora``), which leaves the offload's
placement alone.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAX_LORA_WEIGHT = 4.0  # a request's adapter weights lie within ±this; diffusers' examples use 0 to 1.5
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # peft keeps adapters in ModuleDicts: no dots


class LoraError(ValueError):
    """An adapter that cannot be loaded; the message names the adapter and the fix."""


def lora_adapters(pipeline: Any) -> tuple[str, ...]:
    """The names of the LoRA adapters loaded into ``pipeline``, in loading order (none without LoRA support)."""
    listed = getattr(pipeline, "get_list_adapters", None)
    if not callable(listed) or not hasattr(pipeline, "set_adapters"):
        return ()
    names: dict[str, None] = {}
    for component_names in listed().values():  # {"transformer": ["a", "b"], "text_encoder": ["a"]}
        names.update(dict.fromkeys(component_names))
    return tuple(names)


def load_lora_adapters(pipeline: Any, adapters: Sequence[tuple[str, Path]]) -> tuple[str, ...]:
    """Load each ``(name, path)`` with ``pipeline.load_lora_weights(path, adapter_name=name)``, offline.

    Call it before ``vramferry.apply``. All adapters are then active at weight 1.0.

    Args:
        pipeline: a diffusers pipeline with LoRA support (``load_lora_weights``).
        adapters: names and local folders (holding ``pytorch_lora_weights.safetensors``) or weight files.

    Returns:
        The names of the adapters now loaded.

    Raises:
        LoraError: a bad or repeated name, a missing path, a pipeline without LoRA support, or a file that
            diffusers cannot load into this pipeline.
    """
    if not adapters:
        return lora_adapters(pipeline)
    if not callable(getattr(pipeline, "load_lora_weights", None)):
        raise LoraError(
            f"{type(pipeline).__name__} has no LoRA support (no load_lora_weights); serve a pipeline that has "
            "(FluxPipeline, StableDiffusion3Pipeline, ...) or leave out the adapters"
        )
    seen: set[str] = set()
    for name, path in adapters:
        if not ADAPTER_NAME.fullmatch(name):
            raise LoraError(f"{name}: an adapter name is 1 to 64 letters, digits, '_' or '-'")
        if name in seen:
            raise LoraError(f"{name}: named twice; give each adapter its own name")
        seen.add(name)
        if not Path(path).exists():
            raise LoraError(f"{name}: {path} does not exist; give a local LoRA folder or .safetensors file")
    for name, path in adapters:
        path = Path(path)
        # A folder is passed as is (diffusers finds its weight file); a file as its folder and weight_name.
        where = (str(path), {}) if path.is_dir() else (str(path.parent), {"weight_name": path.name})
        try:
            pipeline.load_lora_weights(where[0], adapter_name=name, local_files_only=True, **where[1])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LoraError(
                f"{name}: diffusers could not load {path} into {type(pipeline).__name__}: {first}"
            ) from exc
        logger.info("loaded LoRA adapter %s from %s", name, path)
    names = lora_adapters(pipeline)
    pipeline.set_adapters(list(names), adapter_weights=[1.0] * len(names))
    return names


def check_lora_weights(weights: Mapping[str, float], loaded: Sequence[str]) -> tuple[str, str] | None:
    """The first problem with a request's ``lora``, as ``(adapter name, message)``; ``None`` when it is valid."""
    for name, weight in weights.items():
        if name not in loaded:
            served = ", ".join(loaded) if loaded else "none (start the server with --lora NAME=PATH)"
            return name, f"no LoRA adapter {name!r} is loaded (loaded: {served})"
        if not (math.isfinite(weight) and -MAX_LORA_WEIGHT <= weight <= MAX_LORA_WEIGHT):
            return name, f"weight {weight} is outside [-{MAX_LORA_WEIGHT:g}, {MAX_LORA_WEIGHT:g}]"
    return None


class LoraSwitch:
    """The adapter weights active on a pipeline; :meth:`use` changes them only when a request asks for others."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.current: dict[str, float] | None = None  # unknown: the first request sets its own
        self.switches = 0

    def use(self, weights: Mapping[str, float] | None) -> None:
        """Make ``weights`` (adapter name → weight) active; ``{}`` disables LoRA, ``None`` leaves it as it is."""
        if weights is None or dict(weights) == self.current:
            return
        previous, self.current = self.current, None  # unknown until the switch is complete
        if not weights:
            self.pipeline.disable_lora()
        else:
            if previous is None or previous == {}:
                self.pipeline.enable_lora()  # undoes an earlier disable_lora; a no-op otherwise
            self.pipeline.set_adapters(list(weights), adapter_weights=list(weights.values()))
        self.current = dict(weights)
        self.switches += 1
        logger.debug("LoRA adapters now %s", self.current or "disabled")
