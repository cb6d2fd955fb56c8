"""Configuration as data: one frozen dataclass shared by the Python API, the CLI and the server."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from .units import parse_bytes

CONFIG_VERSION = 1


class OffloadMode(str, Enum):
    """How weights are placed. The values are the CLI's ``--offload`` choices."""

    NONE = "none"  # everything on the execution device
    MODEL = "model"  # whole components swapped in when they run
    LAYERWISE = "layerwise"  # DiT blocks streamed through the device, the rest swapped
    AUTO = "auto"  # the planner picks per component and per block within the budget

    def __str__(self) -> str:
        return self.value


class Compression(str, Enum):
    """Whether moved weights cross the link compressed. The values are the CLI's ``--compression`` choices."""

    AUTO = "auto"  # where the plan predicts a gain and the codec is installed
    OFF = "off"  # never
    LOSSLESS = "lossless"  # every moved piece of plain tensors, with a lossless codec

    def __str__(self) -> str:
        return self.value


def _number_checked(value: Any, field: str) -> Any:
    """``value`` unless it is a boolean, a NaN or an infinity given as a number: those raise, naming ``field``."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a number or a size such as '16GiB', got the boolean {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{field}: expected a finite number or a size such as '16GiB', got {value!r}")
    return value


def _valid_budget(value: int | str | None) -> int | str | None:
    if value is None:
        return None
    _number_checked(value, "vram_budget")
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            percent = float(value.strip()[:-1])
        except ValueError:
            percent = -1.0
        if not 0 < percent <= 100:
            raise ValueError(f"vram_budget: a percentage must lie in (0, 100], got {value!r}")
        return value.strip()
    if parse_bytes(value, what="vram_budget") <= 0:
        raise ValueError(f"vram_budget: must be positive, got {value!r}")
    return value


def _valid_helpers(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ValueError(f"helper_devices: give a list of devices, not the string {value!r}")
    found = []
    for name in value:
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError):
            raise ValueError(f"helper_devices: {name!r} is not a device; use 'cuda:1'") from None
        if device.type != "cuda" or device.index is None:
            raise ValueError(f"helper_devices: {name!r} must be a numbered CUDA device such as 'cuda:1'")
        if str(device) in found:
            raise ValueError(f"helper_devices: {name!r} is listed twice")
        found.append(str(device))
    return tuple(found)


def _valid_share(value: Any) -> bool | str:
    if isinstance(value, bool):
        return value
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and value.strip():
        lowered = value.strip().lower()
        if lowered in ("true", "on", "yes"):
            return True
        if lowered in ("false", "off", "no"):
            return False
        return value.strip()
    raise ValueError(f"share_host_store: expected True, False or a folder in shared memory, got {value!r}")


@dataclass(frozen=True)
class OffloadConfig:
    """What to offload and how.

    Args:
        mode: ``none``, ``model``, ``layerwise`` or ``auto`` (see :class:`OffloadMode`).
        vram_budget: device memory the pipeline may use: bytes, ``"16GiB"``, ``"80%"`` of the free memory at
            apply time, or ``None`` for the free memory minus ``safety_margin``.
        onload_device: where modules run. ``"cpu"`` runs the whole hook machinery without a GPU.
        pin_memory: keep host copies in page-locked memory (needed for full-speed, asynchronous copies).
        host_memory_limit: most host memory the host store may take (bytes or ``"48GiB"``; CLI
            ``--ram-budget``). Below what it would hold, the pieces that move least often (resident first, then
            swapped, streamed blocks last) stay as views of their checkpoint files (memory-mapped safetensors, in
            the page cache, shared with other processes), copied to the device at the pageable bandwidth, which
            the planner counts; weights that are not file views are page-locked up to the limit and kept pageable
            beyond it, with a warning. ``None``: no cap.
        prefetch_components: start loading the next component while the current one computes.
        prefetch_depth: layerwise look-ahead, in blocks; ``None`` picks enough to keep the copy engine busy.
        keep_resident: component names kept on the device in every mode.
        order: component names in the order a request runs them, overriding discovery's order (diffusers'
            ``model_cpu_offload_seq``, the protocol's declaration). The schedule follows it: give
            ``("transformer", "vae")`` when prompt embeddings are passed in and the text encoders never run.
        block_attrs: per DiT name, the attributes holding its repeated blocks in execution order, overriding
            discovery (``{"transformer": ("transformer_blocks", "single_transformer_blocks")}``).
        safety_margin: memory left free when ``vram_budget`` is ``None``.
        verify: check before every module runs that all its weights are on the execution device.
        strict: turn discovery warnings into errors.
        compression: ``auto``, ``off`` or ``lossless`` (see :class:`Compression`): keep moved weights
            compressed in host memory and decode them on the device after the copy. Bitwise exact; needs
            ``vramferry[compress]``. ``auto`` compresses where the plan predicts a faster request (never on a
            CPU execution device, where there is no link to save).
        compression_cache: where the pieces ``compression`` keeps compressed find their compressed bytes ready
            (written by ``vramferry compress``): ``"auto"``, in the pipeline's own folder when it was loaded from
            one (``MODEL_DIR/.vramferry/compressed``); ``"off"``, never; or a cache folder (``vramferry compress
            --cache-dir``). An entry is used only when it matches the weights; the rest are compressed at apply.
        helper_devices: other GPUs (``("cuda:1",)``) whose PCIe links carry part of every streamed block: each
            copies its slice into a staging buffer of its own, then peer to peer into the execution device's slot
            (:mod:`~vramferry.runtime.links`); their bandwidths are measured at apply and the plan counts them.
            Compressed and staged loads use the execution device's link alone. The execution device itself may
            be named (it adds no link; the helper path runs, for testing).
        share_host_store: keep the host store's arenas in shared memory, shared by every process on this
            machine that loads the same checkpoint files (one process per GPU, Ray Serve replicas): the weights
            are held and read from disk once, and each process page-locks the same pages
            (:mod:`~vramferry.runtime.shared`). ``True``: in ``/dev/shm``; a folder: there (on a memory-backed
            file system); ``False``: each process holds its own copy. Only arenas whose weights are read from
            checkpoint files (``vramferry.load``, or a pipeline fresh from ``from_pretrained``) are shared.
            Copies to the device read the shared pages: a weight changed in place reaches the device when the
            change is one the handle takes in (an adapter fused or unfused), not when it is written directly.
        warm_up: on a GPU, while the host store fills, run each distinct layer of the pipeline once on the
            device with scratch weights (:mod:`~vramferry.runtime.warmup`), so that the first request finds
            CUDA's libraries and kernels loaded instead of loading them as it goes.
    """

    mode: OffloadMode = OffloadMode.AUTO
    vram_budget: int | str | None = None
    onload_device: str = "cuda"
    pin_memory: bool = True
    host_memory_limit: int | str | None = None
    prefetch_components: bool = True
    prefetch_depth: int | None = None
    keep_resident: tuple[str, ...] = ()
    order: tuple[str, ...] = ()
    block_attrs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    safety_margin: int | str = "1GiB"
    verify: bool = False
    strict: bool = False
    compression: Compression = Compression.AUTO
    compression_cache: str = "auto"
    helper_devices: tuple[str, ...] = ()
    share_host_store: bool | str = False
    warm_up: bool = True

    def __post_init__(self) -> None:
        try:
            mode = OffloadMode(self.mode)
        except ValueError:
            choices = ", ".join(m.value for m in OffloadMode)
            raise ValueError(f"mode: {self.mode!r} is not one of {choices}") from None
        object.__setattr__(self, "mode", mode)
        try:
            compression = Compression(self.compression)
        except ValueError:
            choices = ", ".join(c.value for c in Compression)
            raise ValueError(f"compression: {self.compression!r} is not one of {choices}") from None
        object.__setattr__(self, "compression", compression)
        if isinstance(self.compression_cache, os.PathLike):
            object.__setattr__(self, "compression_cache", os.fspath(self.compression_cache))
        if not isinstance(self.compression_cache, str) or not self.compression_cache.strip():
            raise ValueError(
                f"compression_cache: expected 'auto', 'off' or a folder, got {self.compression_cache!r}"
            )
        object.__setattr__(self, "vram_budget", _valid_budget(self.vram_budget))
        try:
            device = torch.device(self.onload_device)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"onload_device: {self.onload_device!r} is not a device; use 'cuda', 'cuda:1' or 'cpu'"
            ) from None
        object.__setattr__(self, "onload_device", str(device))
        if self.host_memory_limit is not None:
            parse_bytes(
                _number_checked(self.host_memory_limit, "host_memory_limit"), what="host_memory_limit"
            )
        parse_bytes(_number_checked(self.safety_margin, "safety_margin"), what="safety_margin")
        if self.prefetch_depth is not None and (
            isinstance(self.prefetch_depth, bool)
            or not isinstance(self.prefetch_depth, int)
            or self.prefetch_depth < 1
        ):
            raise ValueError(
                f"prefetch_depth: must be a whole number ≥ 1 or None, got {self.prefetch_depth!r}"
            )
        for name in ("pin_memory", "prefetch_components", "verify", "strict", "warm_up"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if isinstance(self.keep_resident, str):
            raise ValueError(
                f"keep_resident: give a list of component names, not the string {self.keep_resident!r}"
            )
        object.__setattr__(self, "keep_resident", tuple(self.keep_resident))
        if isinstance(self.order, str):
            raise ValueError(f"order: give a list of component names, not the string {self.order!r}")
        object.__setattr__(self, "order", tuple(str(name) for name in self.order))
        attrs = {}
        for dit, names in dict(self.block_attrs).items():
            if isinstance(names, str):
                names = (names,)
            attrs[str(dit)] = tuple(names)
        object.__setattr__(self, "block_attrs", attrs)
        object.__setattr__(self, "helper_devices", _valid_helpers(self.helper_devices))
        object.__setattr__(self, "share_host_store", _valid_share(self.share_host_store))

    @property
    def exclusive(self) -> bool:
        """No ``vram_budget`` was given. The mode's exclusion rules then hold strictly (a DiT and the encoders
        never share the device, nor do two DiTs), a phase change evicts only what the next phase excludes, and
        streaming slots are sized per block. With a budget, the plan counts each phase's swapped parts and slots
        in that phase alone: a phase change evicts the other phases', and slots are sized uniformly."""
        return self.vram_budget is None

    @property
    def device(self) -> torch.device:
        """The execution device as a ``torch.device`` (no CUDA initialisation)."""
        return torch.device(self.onload_device)

    def replace(self, **changes: Any) -> OffloadConfig:
        """A copy with ``changes`` applied; the original is left as it is."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, with a ``version`` field."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["mode"] = self.mode.value
        data["compression"] = self.compression.value
        data["keep_resident"] = list(self.keep_resident)
        data["order"] = list(self.order)
        data["block_attrs"] = {k: list(v) for k, v in self.block_attrs.items()}
        data["helper_devices"] = list(self.helper_devices)
        return {"version": CONFIG_VERSION, **data}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OffloadConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(
                f"config version {version!r} is not supported (this vramferry reads version {CONFIG_VERSION})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown config field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> OffloadConfig:
        return cls.from_dict(json.loads(text))
