"""The one thread that runs the pipeline, behind a bounded queue.

The pipeline is not thread-safe and the device has room for one request at a time, so every request goes through
a single worker thread. A full queue is refused at once (the route answers 429). A job given up while it waits (its
deadline passed, its client left) leaves the queue at once, so its slot serves the next request; one given up while
it runs is aborted at its next denoising step. Whatever the pipeline raises, the thread answers the job and goes on.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import BudgetError
from .generation import GenerationParams, StepCallback, generate, request_workload
from .lora import LoraSwitch
from .media import encode_image
from .metrics import ServerMetrics

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The worker's queue holds ``max_queue`` jobs already."""


class WorkerStopped(Exception):
    """The worker thread is not running."""


class GenerationOutOfMemory(Exception):
    """The device (or the host) ran out of memory on this job; its memory was released and the next job may run."""


class GenerationFailed(Exception):
    """The pipeline raised on this job. The message is generic: the details go to the server's log only."""


class DeliveryError(Exception):
    """Raised by a job's ``deliver`` (a video over the spool's limit); its message is the client's answer."""


class JobCancelled(Exception):
    """The job was given up (its deadline passed, or its client left) while it ran."""


@dataclass
class Job:
    """One request for the worker.

    Attributes:
        params: what to generate.
        deadline: ``time.monotonic()`` after which the job is given up (checked before it starts and at every step).
        request_id: names the request in the server's log.
        deliver: turns the pipeline's outputs (one PIL image, or list of frames, per item) into the job's result;
            it runs on the worker thread (encoding a video there keeps the event loop free). Default: PNG bytes of
            each image (a video's first frame).
        on_step: called after each denoising step with ``(steps done, total)``, for progress.
    """

    params: GenerationParams
    deadline: float = float("inf")
    request_id: str = "-"
    deliver: Callable[[list[Any]], Any] | None = None
    on_step: StepCallback | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: str = "the request was given up"

    def check(self) -> None:
        """Raise :class:`JobCancelled` if the job was given up or is past its deadline (called at every step)."""
        if not self.cancelled.is_set() and time.monotonic() > self.deadline:
            self.reason = "the request's deadline passed while it ran"
            self.cancelled.set()
        if self.cancelled.is_set():
            raise JobCancelled(self.reason)


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
        self.max_queue = max_queue
        self._workload: Any = None  # the request shape the offload plan was last fitted to
        self.lora = LoraSwitch(
            pipeline
        )  # the adapter weights active now; switched only when a request differs
        self.metrics = metrics
        # The waiting jobs. A deque, not a queue.Queue: a job given up while it waits must leave it (and free its
        # slot) at once, not when the worker reaches it.
        self._waiting: deque[Job] = deque()
        self._changed = threading.Condition()  # guards _waiting and _thread; notified on submit and stop
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None  # the running thread's stop signal
        self._running: Job | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def idle(self) -> bool:
        """No job running and none waiting."""
        return self._running is None and not self._waiting

    @property
    def running(self) -> bool:
        """A job is running."""
        return self._running is not None

    @property
    def waiting(self) -> int:
        """Jobs in the queue (the running one not included)."""
        return len(self._waiting)

    @property
    def dead(self) -> bool:
        """Started, not stopped, and yet not running (the thread ended on its own)."""
        return self._thread is not None and not self._thread.is_alive()

    def start(self) -> None:
        with self._changed:
            if not self.alive:
                self._stop = threading.Event()
                self._thread = threading.Thread(
                    target=self._loop, args=(self._stop,), name="vramferry-worker", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the waiting jobs and end the thread after the running one."""
        with self._changed:
            thread, self._thread = self._thread, None
            if self._stop is not None:
                self._stop.set()
            waiting = list(self._waiting)
            self._waiting.clear()
            self._changed.notify_all()
        for job in waiting:
            _give_up(job, "the server is stopping")
        self.metrics.queue_depth.set(0)
        if thread is not None:
            thread.join(timeout)

    def submit(
        self,
        params: GenerationParams,
        *,
        deadline: float = float("inf"),
        request_id: str = "-",
        deliver: Callable[[list[Any]], Any] | None = None,
        on_step: StepCallback | None = None,
    ) -> Job:
        """Queue a job (``deliver``, ``on_step``: see :class:`Job`).

        Raises:
            QueueFull: ``max_queue`` jobs are waiting.
            WorkerStopped: the worker is not running.
        """
        job = Job(params, deadline=deadline, request_id=request_id, deliver=deliver, on_step=on_step)
        with self._changed:
            if not self.alive:
                raise WorkerStopped("the generation worker is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(job)
            self.metrics.queue_depth.set(len(self._waiting))
            self._changed.notify()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Give ``job`` up: a waiting job leaves the queue now (freeing its slot); a running one is aborted at its
        next denoising step."""
        with self._changed:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass  # running, finished, or never queued
            self.metrics.queue_depth.set(len(self._waiting))
        _give_up(job, reason)

    def _next(self, stop: threading.Event) -> Job | None:
        """The next job to run, or ``None`` once ``stop`` is set."""
        with self._changed:
            while not self._waiting and not stop.is_set():
                self._changed.wait()
            if stop.is_set():
                return None
            job = self._waiting.popleft()
            self.metrics.queue_depth.set(len(self._waiting))
            return job

    def _loop(self, stop: threading.Event) -> None:
        try:
            while (job := self._next(stop)) is not None:
                if not job.future.set_running_or_notify_cancel():
                    continue  # given up between leaving the queue and now
                self._running = job
                self.metrics.in_progress.set(1)
                try:
                    self._run(job)
                except BaseException:  # _run answers every job; this is the last guard of the thread's life
                    logger.exception("request %s: the worker failed to answer it", job.request_id)
                    _answer(job, GenerationFailed("the server failed on this request"))
                finally:
                    self._running = None
                    self.metrics.in_progress.set(0)
        finally:
            # However the loop ends, no caller waits for a job that will never run.
            with self._changed:
                waiting = list(self._waiting) if self._stop is stop else []
                if waiting:
                    self._waiting.clear()
            for job in waiting:
                _answer(job, WorkerStopped("the generation worker has stopped"))

    def _run(self, job: Job) -> None:
        start = time.perf_counter()
        error: Exception | None = None
        result: Any = None
        try:
            job.check()  # its deadline may have passed while it waited
            self._fit_offload(job.params)
            self.lora.use(job.params.lora)  # scales only: the offload's placement stays as it is
            outputs = generate(self.pipeline, job.params, on_step=lambda step, total: _step(job, step, total))
            result = (job.deliver or png_images)(outputs)
        except (
            BaseException
        ) as exc:  # SystemExit and KeyboardInterrupt too: one request must not end the server
            error = _failure(job, exc)
        if isinstance(error, GenerationOutOfMemory):
            # Outside the except block: the exception's frames, which hold the tensors to free, are gone by now.
            _release_device_memory()
        self.metrics.generation.observe(time.perf_counter() - start)
        self._observe_runtime()
        if error is None:
            if isinstance(result, Path):  # a video file
                self.metrics.videos.inc()
            else:
                self.metrics.images.inc(len(result))
            _answer(job, result)
        else:
            _answer(job, error)

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


def png_images(outputs: list[Any]) -> list[bytes]:
    """Each output as PNG bytes (a video's first frame)."""
    return [encode_image(item[0] if isinstance(item, list) else item, "png") for item in outputs]


def _step(job: Job, step: int, total: int) -> None:
    job.check()
    if job.on_step is not None:
        job.on_step(step, total)


def _failure(job: Job, exc: BaseException) -> Exception:
    """What the caller of ``job`` is told about ``exc``; the details go to the log."""
    if isinstance(exc, (JobCancelled, GenerationOutOfMemory, DeliveryError)):
        return exc
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        where = "device" if isinstance(exc, torch.OutOfMemoryError) else "host"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        logger.warning("request %s: out of %s memory: %s", job.request_id, where, first)
        # A new exception without the traceback: the old one's frames hold the tensors we want to free.
        return GenerationOutOfMemory(f"out of {where} memory while generating; retry later")
    logger.error("request %s: the pipeline raised", job.request_id, exc_info=exc)
    return GenerationFailed("the pipeline failed on this request")


def _answer(job: Job, outcome: Any) -> None:
    """Complete the job's future, unless its caller already gave it up."""
    try:
        if isinstance(outcome, Exception):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
    except InvalidStateError:
        pass  # cancelled by its caller meanwhile: nobody waits for the answer


def _give_up(job: Job, reason: str) -> None:
    job.reason = reason
    job.cancelled.set()
    job.future.cancel()  # a job that has not started is then skipped; a running one stops at its next step


def _release_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
