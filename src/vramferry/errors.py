"""The exception tree of vramferry.

Every error the library raises on purpose derives from :class:`OffloadError`, so callers can catch one type::

    OffloadError            anything vramferry refuses or cannot do
    ├── DiscoveryError      the pipeline's modules could not be found or classified
    ├── PlanError           no placement satisfies the request
    │   └── BudgetError     the VRAM budget is below what the pipeline needs at the least
    ├── DeviceError         the execution device is missing or unusable
    ├── ConflictError       another offload (ours or a peer's) already owns the pipeline
    ├── LoadError           a model folder or hub id could not be loaded
    └── CodecUnavailable    compression was asked for, and its codec's package is not installed

Messages name the culprit (pipeline class, attribute path, bytes needed vs available) and the fix.
"""

from __future__ import annotations


class OffloadError(Exception):
    """Base class of every error raised by vramferry."""


class DiscoveryError(OffloadError):
    """The pipeline's offloadable modules could not be found or are declared inconsistently."""


class PlanError(OffloadError):
    """No placement satisfies the configuration."""


class BudgetError(PlanError):
    """The VRAM budget is smaller than the least the pipeline needs."""


class DeviceError(OffloadError):
    """The execution device is missing, or cannot do what the configuration asks."""


class ConflictError(OffloadError):
    """The pipeline is already managed by a live vramferry handle or by another offload system."""


class LoadError(OffloadError):
    """A model folder or hub id could not be turned into a pipeline."""


class CodecUnavailable(OffloadError):
    """Compression was asked for and the package its codec needs is not installed (``vramferry[compress]``)."""


def one_line(exc: BaseException) -> str:
    """``exc`` as one line for a message: its type and the first line of its text."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
