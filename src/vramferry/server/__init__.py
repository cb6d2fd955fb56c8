"""The OpenAI-style HTTP server (``vramferry serve``). Needs the ``server`` extra (fastapi, uvicorn)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import ServerSettings, create_app
    from .serving import uvicorn_options

__all__ = ["ServerSettings", "create_app", "uvicorn_options"]

_HOMES = {"ServerSettings": "app", "create_app": "app", "uvicorn_options": "serving"}


def __getattr__(name: str) -> Any:
    # Lazy: importing vramferry.server.generation (used by the CLI) must not need fastapi or uvicorn.
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(name)
