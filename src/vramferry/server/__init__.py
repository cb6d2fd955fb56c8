"""The OpenAI-style HTTP server (``vramferry serve``). Needs the ``server`` extra (fastapi, uvicorn)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy: importing vramferry.server.generation (used by the CLI) must not need fastapi.
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
