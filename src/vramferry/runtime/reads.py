"""``verify=True`` for weights read outside any module's forward: a pipeline's ``__call__`` that reads
``self.transformer.pos_embed.weight`` itself, before the DiT runs, reads the host copy (on a GPU, a device
mismatch deep inside torch). No hook sees such a read; a torch function mode around the pipeline's call does, and
names the weight."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import OffloadError
from .pieces import Unit

logger = logging.getLogger(__name__)

# What reads no data: descriptors (``.dtype``, ``.device``, ``.data``, also the runtime rebinding a weight) and
# questions about shape, type and layout.
_METADATA = frozenset(
    {
        "__get__",
        "__set__",
        "__len__",
        "__repr__",
        "__format__",
        "__hash__",
        "is_floating_point",
        "is_complex",
        "is_contiguous",
        "is_inference",
        "dim",
        "size",
        "numel",
        "stride",
        "element_size",
        "data_ptr",
        "storage_offset",
        "untyped_storage",
        "get_device",
        "requires_grad_",
    }
)


class WeightReads(TorchFunctionMode):
    """Raises :class:`OffloadError` when a torch function gets a weight whose unit is not on the device.

    Args:
        units: returns every unit of the handle now; their parameters are the weights watched. Asked at each
            pipeline call, since a re-placement builds new units.
        roots: the components' modules.
    """

    def __init__(self, units: Callable[[], Iterable[Unit]], roots: Iterable[nn.Module]) -> None:
        super().__init__()
        self.units = units
        self.roots = list(roots)
        self.owner: dict[int, tuple[str, Unit]] = {}
        self.told = False

    def around_call(self) -> contextlib.AbstractContextManager:
        """This mode, watching the current units; a null context while a component holds a compiled module:
        dynamo cannot trace through a torch function mode (the compiled block's graph would break), so the
        check around the call is left out then, and the per-module checks remain."""
        if any(m._compiled_call_impl is not None for root in self.roots for m in root.modules()):
            if not self.told:
                self.told = True
                logger.info("vramferry: verify: compiled modules found; weight reads outside forwards unchecked")
            return contextlib.nullcontext()
        self.owner = {}
        for unit in self.units():
            for ref in unit.refs:
                module, name = ref.owners[0]
                for param in ref.params:
                    self.owner[id(param)] = (f"{type(module).__name__}.{name}", unit)
        return self

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in _METADATA:
            for value in tree_flatten((args, kwargs))[0]:
                found = self.owner.get(id(value))
                if found is not None and not found[1].on_device:
                    name, unit = found
                    raise OffloadError(
                        f"verify: the weight {name} is read outside any module's forward (by "
                        f"{getattr(func, '__name__', func)}) while its unit {unit.name} is not loaded: offload "
                        "loads weights when their module runs. Call the module instead, or keep its component "
                        "resident (keep_resident)."
                    )
        return func(*args, **kwargs)
