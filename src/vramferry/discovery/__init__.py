"""Discovery: a pipeline's components and their roles, their repeated blocks, and the inventory of their sizes.

Pure: it reads attributes and walks module trees, moves nothing and makes no CUDA calls.
"""

from .blocks import BlockSet, find_encoder_blocks
from .inventory import ComponentSize, Inventory, inventory_of
from .modules import Component, PipelineModules, Role
from .roles import discover, request_order
from .sizes import tensor_key

__all__ = [
    "BlockSet",
    "Component",
    "ComponentSize",
    "Inventory",
    "PipelineModules",
    "Role",
    "discover",
    "find_encoder_blocks",
    "inventory_of",
    "request_order",
    "tensor_key",
]
