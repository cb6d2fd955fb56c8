"""What applying to real pipelines needs besides the plan: the execution device, the checks that a pipeline is
not offloaded by a peer already, that a given plan or order matches it, and diffusers' execution device."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from .config import OffloadConfig
from .discovery.modules import PipelineModules
from .errors import ConflictError, DeviceError, PlanError
from .planning.plan import Plan


def resolve_device(config: OffloadConfig) -> torch.device:
    """The execution device with an explicit index, or a :class:`DeviceError` saying what to do."""
    device = config.device
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"onload_device {device} is not supported; use 'cuda', 'cuda:N' or 'cpu'")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no GPU is visible"
        raise DeviceError(
            f"onload_device is {device} but CUDA is not available (torch {torch.__version__} is {build}). "
            "Pass onload_device='cpu' to run the offload machinery on the CPU, or run on a machine with a GPU."
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(
            f"onload_device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return torch.device("cuda", index)


def check_component_names(config: OffloadConfig, modules: PipelineModules) -> None:
    """Raise :class:`PlanError` when ``keep_resident`` names something that is not a component."""
    known = {name for c in modules.components() for name in (c.name, *c.aliases)}
    unknown = [name for name in config.keep_resident if name not in known]
    if unknown:
        found = ", ".join(c.name for c in modules.components())
        raise PlanError(
            f"keep_resident: {', '.join(map(repr, unknown))} is not a component of {modules.pipeline_class}; "
            f"its components: {found}"
        )


def request_order_of(config: OffloadConfig, modules: PipelineModules) -> tuple[str, ...]:
    """The request order the schedule follows: ``config.order`` when given (every name a component), else
    discovery's."""
    if not config.order:
        return modules.order
    names = []
    for name in config.order:
        try:
            names.append(modules.get(name).name)
        except KeyError:
            found = ", ".join(c.name for c in modules.components())
            raise PlanError(
                f"order: {name!r} is not a component of {modules.pipeline_class}; its components: {found}"
            ) from None
    return tuple(names)


def check_foreign_hooks(modules: PipelineModules, handles: Mapping) -> None:
    """Raise :class:`ConflictError` when a component is offloaded already: by a live vramferry handle (in
    ``handles``, module -> handle), by accelerate's hooks or by diffusers' hook registry."""
    for component in modules.components():
        live = handles.get(component.module)
        if live is not None:
            raise ConflictError(
                f"{component.name} ({type(component.module).__name__}) is already offloaded by {live!r} through "
                "another pipeline; call that handle's remove() first"
            )
        for path, module in component.module.named_modules():
            where = f"{component.name}.{path}".rstrip(".")
            if hasattr(module, "_hf_hook"):
                raise ConflictError(
                    f"{where} carries an accelerate hook (enable_model_cpu_offload, enable_sequential_cpu_offload or "
                    "a device_map); call pipe.remove_all_hooks() (or accelerate's remove_hook_from_module) first"
                )
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and getattr(registry, "hooks", None):
                raise ConflictError(
                    f"{where} carries diffusers hooks ({', '.join(registry.hooks)}), e.g. group offloading; "
                    "remove them before applying vramferry"
                )


def check_plan(the_plan: Plan, modules: PipelineModules) -> None:
    """A given plan must place exactly the discovered components, blocks one by one where it places them."""
    if not isinstance(the_plan, Plan):
        raise PlanError(f"apply: plan must be a vramferry Plan, got {type(the_plan).__name__}")
    planned = [c.name for c in the_plan.components]
    found = [c.name for c in modules.components()]
    missing, extra = [n for n in found if n not in planned], [n for n in planned if n not in found]
    if missing or extra or len(set(planned)) != len(planned):
        raise PlanError(
            f"apply: the plan does not match {modules.pipeline_class}: it places {', '.join(planned) or 'nothing'}, "
            f"discovery found {', '.join(found) or 'nothing'}"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; unknown: {', '.join(extra)}" if extra else "")
            + ". Make the plan for this pipeline (vramferry.planning.plan on its inventory)."
        )
    for cplan in the_plan.components:
        blockset = modules.blocks_of(cplan.name)
        count = len(blockset.blocks) if blockset is not None else 0
        if cplan.blocks and len(cplan.blocks) != count:
            raise PlanError(
                f"apply: the plan places {len(cplan.blocks)} blocks of {cplan.name}, but discovery found {count}"
            )


def patch_pipeline_class(
    pipeline: object, device: torch.device, reads: Any = None, before_call: Any = None
) -> type | None:
    """Swap in a subclass of the pipeline's class (same name and module; ``remove()`` swaps the original back)
    that makes a diffusers pipeline create its latents and embeddings on the execution device, calls
    ``before_call()`` at the start of every call (outside every module's forward, where the offload may re-place
    weights and hooks) and, given ``reads`` (a :class:`~vramferry.runtime.reads.WeightReads`, under
    ``verify=True``), runs every call inside it.

    diffusers infers ``_execution_device`` from where the components' weights are, which is the host for
    offloaded ones. Returns the original class, or ``None`` when nothing needed patching.
    """
    cls = type(pipeline)
    members: dict[str, Any] = {}
    if isinstance(getattr(cls, "_execution_device", None), property):
        members["_execution_device"] = property(lambda self: device)
    if (reads is not None or before_call is not None) and callable(pipeline):

        # wraps: the signature stays the pipeline's own (callers inspect it to see which arguments it takes).
        @functools.wraps(cls.__call__)
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if before_call is not None:
                before_call()
            if reads is None:
                return cls.__call__(self, *args, **kwargs)
            with reads.around_call():
                return cls.__call__(self, *args, **kwargs)

        members["__call__"] = __call__
    if not members:
        return None
    patched = type(
        cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__, **members}
    )
    pipeline.__class__ = patched
    return cls
