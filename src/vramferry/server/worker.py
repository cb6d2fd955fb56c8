"""The one thread that runs the pipeline, behind a bounded queue.

The pipeline is not thread-safe and the device has room for one request at a time, so every request goes through
a single worker thread. A full queue is refused at once (the route answers 429); a job whose caller gave up before
it started is skipped; a job that runs past its deadline is aborted at the next denoising step.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import BudgetError
from .generation import GenerationParams, generate, png_bytes, request_workload
from .metrics import ServerMetrics

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The worker's queue holds ``max_queue`` jobs already."""


class WorkerStopped(Exception):
    """The worker thread is not running."""


class GenerationOutOfMemory(Exception):
    """The device ran out of memory on this job (its memory was released; the next job may run)."""


class GenerationFailed(Exception):
    """The pipeline raised on this job."""


class JobCancelled(Exception):
    """The job was given up (its deadline passed) while it ran."""


@dataclass
class Job:
    params: GenerationParams
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Give the job up: it is skipped if it has not started, and aborted at its next step if it has."""
        self.cancelled.set()
        self.future.cancel()


class GenerationWorker:
    """Runs jobs on ``pipeline`` one at a time in a daemon thread.

    Args:
        pipeline: the (offloaded) pipeline.
        handle: the ``OffloadHandle`` managing it, or ``None``; its ``stats()`` feed the metrics.
        max_queue: jobs that may wait; more are refused with :class:`QueueFull`.
        metrics: where to report queue depth, memory and bytes moved.
    """

    def __init__(self, pipeline: Any, handle: Any, max_queue: int, metrics: ServerMetrics) -> None:
        self.pipeline = pipeline
        self.handle = handle
        self._workload: Any = None  # the request shape the offload plan was last fitted to
        self.metrics = metrics
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._running = False

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def idle(self) -> bool:
        """No job running and none waiting."""
        return not self._running and self._queue.empty()

    @property
    def dead(self) -> bool:
        """Started, not stopped, and yet not running (the thread ended on its own)."""
        return self._thread is not None and not self._thread.is_alive()

    def start(self) -> None:
        with self._lock:
            if not self.alive:
                self._thread = threading.Thread(target=self._loop, name="vramferry-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the waiting jobs and end the thread after the running one."""
        with self._lock:
            thread, self._thread = self._thread, None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def submit(self, params: GenerationParams) -> Job:
        """Queue a job.

        Raises:
            QueueFull: ``max_queue`` jobs are waiting.
            WorkerStopped: the worker is not running.
        """
        if not self.alive:
            raise WorkerStopped("the generation worker is not running")
        job = Job(params)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(
                f"the queue is full ({self._queue.maxsize} requests waiting); retry later"
            ) from None
        self.metrics.queue_depth.set(self._queue.qsize())
        return job

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            self.metrics.queue_depth.set(self._queue.qsize())
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                logger.debug("skipping a job whose caller gave up before it started")
                continue
            self._running = True
            self.metrics.in_progress.set(1)
            try:
                self._run(job)
            finally:
                self._running = False
                self.metrics.in_progress.set(0)

    def _run(self, job: Job) -> None:
        start = time.perf_counter()
        error: Exception | None = None
        out_of_memory = False
        try:
            self._fit_offload(job.params)
            images = generate(self.pipeline, job.params, on_step=lambda step, total: _check(job))
            result = [png_bytes(image if not isinstance(image, list) else image[0]) for image in images]
        except (JobCancelled, GenerationOutOfMemory) as exc:
            error = exc
        except torch.OutOfMemoryError as exc:
            logger.warning(
                "out of device memory on a request: %s", str(exc).splitlines()[0] if str(exc) else exc
            )
            # A new exception without the traceback: the old one's frames hold the tensors we want to free.
            error, out_of_memory = (
                GenerationOutOfMemory("out of device memory while generating; retry later"),
                True,
            )
        except Exception as exc:
            logger.exception("the pipeline failed on a request")
            error = GenerationFailed(f"{type(exc).__name__}: {exc}")
        if out_of_memory:
            _release_device_memory()
        self.metrics.generation.observe(time.perf_counter() - start)
        self._observe_runtime()
        if error is not None:
            job.future.set_exception(error)
        else:
            self.metrics.images.inc(len(result))
            job.future.set_result(result)

    def _fit_offload(self, params: GenerationParams) -> None:
        """In auto mode, re-plan when a request's shape differs from the last one (it changes what fits), or
        when block times measured during earlier requests are not in the plan yet."""
        handle = self.handle
        if handle is None or not hasattr(handle, "replan") or str(handle.config.mode) != "auto":
            return
        workload = request_workload(params)
        fresh = bool(getattr(handle, "has_new_measurements", False))
        if workload is None or workload == self._workload and not fresh:
            return
        try:
            handle.replan(workload)
        except BudgetError as exc:
            raise GenerationOutOfMemory(f"this request does not fit the VRAM budget: {exc}") from None
        self._workload = workload

    def _observe_runtime(self) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.metrics.observe_memory(torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
        if self.handle is not None and hasattr(self.handle, "stats"):
            try:
                self.metrics.observe_stats(self.handle.stats())
            except Exception:  # metrics must never fail a request
                logger.debug("could not read the offload handle's stats", exc_info=True)


def _check(job: Job) -> None:
    if job.cancelled.is_set():
        raise JobCancelled("the request's deadline passed while it ran")


def _release_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
