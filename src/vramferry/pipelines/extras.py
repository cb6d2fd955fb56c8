"""Optional dependencies, with an install hint when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA_HINT = "pip install 'vramferry[diffusers]'"


def require_extra(module: str) -> ModuleType:
    """Import an optional dependency, or raise ImportError naming the extra that provides it.

    Args:
        module: the module to import (``"diffusers"``, ``"transformers"``).

    Returns:
        The imported module.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"vramferry needs '{module}' for this; install it with: {EXTRA_HINT}") from exc
