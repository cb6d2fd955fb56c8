"""The declaration a pipeline class makes to say which of its modules play which role."""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable


@runtime_checkable
class SupportsModuleOffload(Protocol):
    """A pipeline that names its offloadable modules.

    Each list holds attribute paths, read from the pipeline instance; dotted paths reach nested objects
    (``"pipe.transformer"``, ``"language_model.model"``). Declaration order is kept.

    Attributes:
        _dit_modules: the denoisers (several for Wan 2.2's two experts).
        _encoder_modules: text, vision or multimodal encoders (OmniGen2's ``"mllm"``).
        _vae_modules: autoencoders (LTX-2's ``"vae"`` and ``"audio_vae"``).
        _resident_modules: small modules that must stay on the GPU (Bagel's ``"bagel.time_embedder"``).
            Optional; empty when absent.

    Example::

        class MyPipeline:
            _dit_modules = ["transformer"]
            _encoder_modules = ["mllm"]
            _vae_modules = ["vae"]
            _resident_modules = []
    """

    _dit_modules: ClassVar[list[str]]
    _encoder_modules: ClassVar[list[str]]
    _vae_modules: ClassVar[list[str]]


def declares_offload(pipeline: object) -> bool:
    """True when ``pipeline`` declares the protocol (``_resident_modules`` is optional)."""
    return isinstance(pipeline, SupportsModuleOffload)
