"""vramferry: run diffusion pipelines larger than the GPU, at the speed the hardware allows.

handle = vramferry.apply(pipe, vramferry.OffloadConfig(mode="auto", vram_budget="16GiB"))
(or ``handle = vramferry.load("path/or/hub-id", mode="auto")``, then ``pipe = handle.pipeline``;
``vramferry.compress("path", compression="lossless")`` once compresses a local checkpoint for them)
image = pipe("a photo of a cat").images[0]
print(handle.stats())
handle.remove()
"""

from .api import OffloadHandle, OffloadStats, apply
from .compressor import compress
from .config import Compression, OffloadConfig, OffloadMode
from .discovery.roles import discover
from .errors import (
    BudgetError,
    CodecUnavailable,
    ConflictError,
    DeviceError,
    DiscoveryError,
    LoadError,
    OffloadError,
    PlanError,
)
from .loader import load
from .planning.workload import Workload
from .protocol import SupportsModuleOffload

__all__ = [
    "apply",
    "load",
    "compress",
    "discover",
    "OffloadHandle",
    "OffloadStats",
    "OffloadConfig",
    "OffloadMode",
    "Compression",
    "Workload",
    "SupportsModuleOffload",
    "OffloadError",
    "DiscoveryError",
    "PlanError",
    "BudgetError",
    "DeviceError",
    "ConflictError",
    "LoadError",
    "CodecUnavailable",
    "__version__",
]
__version__ = "0.1.0"
