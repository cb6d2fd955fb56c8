"""Fakes for the server tests: a pipeline that can be slow, blocked, or fail on purpose, and an offload handle."""

from __future__ import annotations

import inspect
import threading
from types import SimpleNamespace

from PIL import Image


class FakePipeline:
    """A diffusers-shaped pipeline: one solid-colour image per generator, coloured by its seed.

    ``gate``: when given, every call waits for it (after setting ``entered``); while it waits it calls the step
    callback (so a cancelled job aborts) when ``abortable``.
    """

    vae_scale_factor = 8

    def __init__(self, gate: threading.Event | None = None, abortable: bool = True) -> None:
        self.gate = gate
        self.abortable = abortable
        self.finished = 0
        self.entered = threading.Event()
        self.calls = 0
        self.progress_disabled = False

    def set_progress_bar_config(self, **kwargs) -> None:
        self.progress_disabled = kwargs.get("disable", False)

    def __call__(
        self,
        prompt,
        negative_prompt=None,
        num_inference_steps=2,
        width=64,
        height=64,
        guidance_scale=3.5,
        num_images_per_prompt=1,
        generator=None,
        output_type="pil",
        callback_on_step_end=None,
    ):
        self.calls += 1
        self.entered.set()
        for step in range(num_inference_steps):
            while self.gate is not None and not self.gate.wait(0.01):
                if callback_on_step_end is not None and self.abortable:
                    callback_on_step_end(self, step, 0, {})
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, 0, {})
        seeds = [g.initial_seed() for g in generator] if generator else [0] * num_images_per_prompt
        self.finished += 1
        colours = [(s % 251, (s * 7) % 253, (s * 13) % 255) for s in seeds]
        return SimpleNamespace(images=[Image.new("RGB", (width, height), c) for c in colours])


class FailingOnce:
    """Wraps a pipeline; its first call raises ``error``, later calls run the pipeline."""

    def __init__(self, inner, error: BaseException) -> None:
        self.inner = inner
        self.error = error
        self.failures = 0
        self.__signature__ = inspect.signature(inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, **kwargs):
        if self.failures == 0:
            self.failures += 1
            raise self.error
        return self.inner(**kwargs)


class FakeHandle:
    def __init__(self) -> None:
        from vramferry.api import OffloadStats

        self.value = OffloadStats(mode="layerwise", bytes_h2d=0, h2d_gbps=0.0)

    def stats(self):
        self.value.bytes_h2d += 1000
        self.value.h2d_gbps = 42.0
        return self.value


class FakeVideoPipeline:
    """A Wan-shaped video pipeline (``num_frames`` of 4k+1, 16-pixel sides): frame ``i`` is a solid colour.
    ``takes_image``: an image-to-video pipeline (``image`` is the first frame's condition).

    ``steps``: when given, a semaphore each denoising step acquires (the test releases steps one by one); while it
    waits it calls the step callback, so a cancelled job aborts.
    """

    vae_scale_factor_spatial = 8
    vae_scale_factor_temporal = 4

    def __init__(self, steps: threading.Semaphore | None = None, takes_image: bool = False) -> None:
        self.steps = steps
        if not takes_image:  # a text-to-video pipeline: no ``image`` in its signature
            signature = inspect.signature(self.__call__)
            params = [p for name, p in signature.parameters.items() if name != "image"]
            self.__signature__ = signature.replace(parameters=params)
        self.entered = threading.Event()
        self.calls = 0
        self.finished = 0
        self.images: list = []

    def __call__(
        self,
        prompt,
        negative_prompt=None,
        image=None,
        num_inference_steps=2,
        width=32,
        height=32,
        num_frames=9,
        guidance_scale=5.0,
        generator=None,
        output_type="pil",
        callback_on_step_end=None,
    ):
        self.calls += 1
        self.images.append(image)
        self.entered.set()
        for step in range(num_inference_steps):
            while self.steps is not None and not self.steps.acquire(timeout=0.01):
                if callback_on_step_end is not None:  # raises once the job is given up
                    callback_on_step_end(self, step - 1, 0, {})  # "step steps done", as before this one
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, 0, {})
        seed = generator[0].initial_seed() if generator else 0
        frames = [
            Image.new("RGB", (width, height), ((seed + 20 * i) % 256, 80, 160)) for i in range(num_frames)
        ]
        self.finished += 1
        return SimpleNamespace(frames=[frames])


class FakeEditPipeline(FakePipeline):
    """An image-to-image pipeline: returns its input, resized to the asked size and tinted by the seed. With
    ``inpaint``, it also takes ``mask_image``."""

    def __init__(self, inpaint: bool = False) -> None:
        super().__init__()
        self.received: list[dict] = []
        if not inpaint:
            self.__signature__ = inspect.signature(self._edit)

    def _edit(
        self,
        prompt,
        image=None,
        strength=0.6,
        num_inference_steps=2,
        width=None,
        height=None,
        guidance_scale=3.5,
        num_images_per_prompt=1,
        generator=None,
        output_type="pil",
        callback_on_step_end=None,
    ):
        return self(
            prompt,
            image=image,
            strength=strength,
            num_inference_steps=num_inference_steps,
            width=width,
            height=height,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
        )

    def __call__(
        self,
        prompt,
        image=None,
        mask_image=None,
        strength=0.6,
        num_inference_steps=2,
        width=None,
        height=None,
        guidance_scale=3.5,
        num_images_per_prompt=1,
        generator=None,
        output_type="pil",
        callback_on_step_end=None,
    ):
        self.calls += 1
        self.received.append({"image": image, "mask_image": mask_image, "strength": strength})
        size = (width or image.width, height or image.height)
        seeds = [g.initial_seed() for g in generator] if generator else [0] * num_images_per_prompt
        out = [Image.blend(image.resize(size), Image.new("RGB", size, (s % 256, 0, 0)), 0.5) for s in seeds]
        return SimpleNamespace(images=out)


class Recording:
    """Wraps a pipeline and records each call's keyword arguments; ``fail(kwargs)`` may return an exception for
    the call to raise instead of running."""

    def __init__(self, inner, fail=None) -> None:
        self.inner = inner
        self.fail = fail
        self.seen: list[dict] = []
        self.__signature__ = inspect.signature(inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def calls(self) -> int:
        return len(self.seen)

    def prompts(self) -> list:
        """Each call's prompt: a string for a request alone, a list (one entry per image) for a batch."""
        return [kwargs["prompt"] for kwargs in self.seen]

    def __call__(self, **kwargs):
        self.seen.append(kwargs)
        error = self.fail(kwargs) if self.fail is not None else None
        if error is not None:
            raise error
        return self.inner(**kwargs)
