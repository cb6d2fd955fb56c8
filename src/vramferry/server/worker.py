"""The one thread that runs the pipeline, behind a bounded queue.

The pipeline is not thread-safe and the device runs one call at a time, so every request goes through a single
worker thread. A full queue is refused at once (the route answers 429). Image requests that can share a call
(:mod:`vramferry.server.batching`) run as one, up to ``max_batch`` images: the first in the queue waits at most
``batch_wait`` seconds for company, then takes every compatible request queued by then. A job given up while it
waits (its deadline passed, its client left) leaves the queue at once, so its slot serves the next request; one
given up while it runs is aborted at its next denoising step, or, in a batch, dropped from it (the call goes on
for the others, and stops once all its requests are given up). Whatever the pipeline raises, the thread answers
the call's jobs and goes on.
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
from .batching import batch_key, generate_batch, planned_batch, take_company
from .generation import GenerationParams, StepCallback, generate, is_video_pipeline, request_workload
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
        alone: never share a pipeline call with other jobs (a batched image may differ slightly from the same
            request run alone; see docs/server.md).
        queued: ``time.monotonic()`` when it was queued.
    """

    params: GenerationParams
    deadline: float = float("inf")
    request_id: str = "-"
    deliver: Callable[[list[Any]], Any] | None = None
    on_step: StepCallback | None = None
    alone: bool = False
    queued: float = field(default_factory=time.monotonic)
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
    """Runs jobs on ``pipeline`` in a daemon thread, one pipeline call at a time.

    Args:
        pipeline: the (offloaded) pipeline.
        handle: the ``OffloadHandle`` managing it, or ``None``; its ``stats()`` feed the metrics, and on a GPU its
            planner bounds the batches.
        max_queue: jobs that may wait; more are refused with :class:`QueueFull`.
        metrics: where to report queue depth, memory and bytes moved.
        max_batch: the most images one call makes for several jobs; 1: each job is its own call.
        batch_wait: seconds the first job in the queue may wait for others to share its call.
    """

    def __init__(
        self,
        pipeline: Any,
        handle: Any,
        max_queue: int,
        metrics: ServerMetrics,
        max_batch: int = 1,
        batch_wait: float = 0.0,
    ) -> None:
        self.pipeline = pipeline
        self.handle = handle
        self.max_queue = max_queue
        # A video pipeline's calls (a video job's, or an image request's first frame) run alone.
        self.max_batch = 1 if is_video_pipeline(pipeline) else max_batch
        self.batch_wait = batch_wait
        self._workload: Any = None  # the request shape the offload plan was last fitted to
        self._planned: dict[tuple, int] = {}  # batch key -> images per call the planner allows
        self._shrunk: dict[tuple, int] = {}  # batch key -> images per call after a batch ran out of memory
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
        self._running: list[Job] = []  # out of the queue, not answered yet: gathering company, or running

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def idle(self) -> bool:
        """No job running and none waiting."""
        return not self._running and not self._waiting

    @property
    def running(self) -> int:
        """Jobs taken out of the queue and not answered yet (those of the call running, or being gathered)."""
        return len(self._running)

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
        alone: bool = False,
    ) -> Job:
        """Queue a job (``deliver``, ``on_step``, ``alone``: see :class:`Job`).

        Raises:
            QueueFull: ``max_queue`` jobs are waiting.
            WorkerStopped: the worker is not running.
        """
        job = Job(
            params, deadline=deadline, request_id=request_id, deliver=deliver, on_step=on_step, alone=alone
        )
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

    def _next(self, stop: threading.Event) -> list[Job] | None:
        """The jobs of the next call (the first in the queue, and those that share its call), or ``None`` once
        ``stop`` is set."""
        with self._changed:
            while not self._waiting and not stop.is_set():
                self._changed.wait()
            if stop.is_set():
                return None
            head = self._waiting.popleft()
            self._running = [head]
            self.metrics.queue_depth.set(len(self._waiting))
        key = self._key(head)
        if key is None:
            return [head]
        cap = min(self._planned_batch(key, head.params), self._shrunk.get(key, self.max_batch))
        if cap <= head.params.n:
            return [head]
        jobs, images = [head], head.params.n
        until = head.queued + self.batch_wait  # the company it waits for, it waits for only this long
        with self._changed:
            while True:
                company = take_company(self._waiting, key, images, cap, self._key)
                jobs += company
                images += sum(job.params.n for job in company)
                self._running = list(jobs)
                left = until - time.monotonic()
                if images >= cap or left <= 0 or stop.is_set():
                    break
                self._changed.wait(left)
            self.metrics.queue_depth.set(len(self._waiting))
        if stop.is_set():
            for job in jobs:
                _give_up(job, "the server is stopping")
            return None
        return jobs

    def _key(self, job: Job) -> tuple | None:
        """The job's :func:`batch_key`, or ``None`` when it runs alone."""
        if job.alone or self.max_batch <= 1:
            return None
        return batch_key(job.params)

    def _planned_batch(self, key: tuple, params: GenerationParams) -> int:
        if key not in self._planned:
            self._planned[key] = planned_batch(self.handle, request_workload(params), self.max_batch)
        return self._planned[key]

    def _loop(self, stop: threading.Event) -> None:
        try:
            while (jobs := self._next(stop)) is not None:
                # Those given up between leaving the queue and now are skipped.
                jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
                self._running = jobs
                if not jobs:
                    continue
                self.metrics.in_progress.set(len(jobs))
                try:
                    self._run(jobs)
                except BaseException:  # _run answers every job; this is the last guard of the thread's life
                    logger.exception("requests %s: the worker failed to answer them", _ids(jobs))
                    for job in jobs:
                        _answer(job, GenerationFailed("the server failed on this request"))
                finally:
                    self._running = []
                    self.metrics.in_progress.set(0)
        finally:
            # However the loop ends, no caller waits for a job that will never run.
            with self._changed:
                waiting = list(self._waiting) if self._stop is stop else []
                if waiting:
                    self._waiting.clear()
            for job in waiting:
                _answer(job, WorkerStopped("the generation worker has stopped"))

    def _run(self, jobs: list[Job]) -> None:
        """One pipeline call for ``jobs`` (one job: exactly as it runs without batching), then each job's answer."""
        start = time.perf_counter()
        error: Exception | None = None
        pieces: list[list[Any]] = []
        images = 0
        try:
            if len(jobs) > 1:
                jobs = _still_wanted(jobs)
                if not jobs:
                    return
            else:
                jobs[0].check()  # its deadline may have passed while it waited
            self._observe_waits(jobs)
            head = jobs[0].params
            images = sum(job.params.n for job in jobs)
            self._fit_offload(head, images)
            self.lora.use(head.lora)  # scales only: the offload's placement stays as it is
            self.metrics.batch_size.observe(images)
            if len(jobs) == 1:
                job = jobs[0]
                pieces = [generate(self.pipeline, head, on_step=lambda step, total: _step(job, step, total))]
            else:
                batch = [job.params for job in jobs]
                pieces = generate_batch(self.pipeline, batch, lambda *_: _check_all(jobs))
        except BaseException as exc:  # SystemExit, KeyboardInterrupt too: one request must not end the server
            error = _failure(_ids(jobs), exc)
        if isinstance(error, GenerationOutOfMemory):
            # Outside the except block: the exception's frames, which hold the tensors to free, are gone by now.
            _release_device_memory()
            key = self._key(jobs[0])
            if key is not None and images > 1:  # the next call of this shape makes fewer images
                self._shrunk[key] = max(1, min(images, self._shrunk.get(key, images)) // 2)
        outcomes = [
            error if error is not None else self._deliver(job, pieces[index], len(jobs) > 1)
            for index, job in enumerate(jobs)
        ]
        seconds = time.perf_counter() - start
        for _job in jobs:
            self.metrics.generation.observe(seconds)
        self._observe_runtime()  # before the answers: a client that reads /metrics next sees this call
        for job, outcome in zip(jobs, outcomes, strict=True):
            _answer(job, outcome)

    def _deliver(self, job: Job, outputs: list[Any], batched: bool) -> Any:
        """The job's result from its outputs (counted in the metrics), or what went wrong; a job of a batch
        that was given up during the call gets nothing (its images are dropped)."""
        if batched and job.cancelled.is_set():
            return JobCancelled(job.reason)
        try:
            result = (job.deliver or png_images)(outputs)
        except BaseException as exc:  # a video over the spool's limit, or a failure to encode
            return _failure(job.request_id, exc)
        if isinstance(result, Path):  # a video file
            self.metrics.videos.inc()
        else:
            self.metrics.images.inc(len(result))
        return result

    def _observe_waits(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        for job in jobs:
            self.metrics.waiting.observe(max(0.0, now - job.queued))

    def _fit_offload(self, params: GenerationParams, images: int) -> None:
        """Re-plan when a call's shape (its request's, with ``images`` per call) differs from the last one, or
        when block times measured during earlier calls are not in the plan yet. In auto mode the shape changes
        what fits; in every mode the plan's predictions follow it, and block times measured during the call are
        kept for its own shape (a batch of three is not timed as one image)."""
        handle = self.handle
        if handle is None or not hasattr(handle, "replan") or str(handle.config.mode) == "none":
            return
        workload = request_workload(params, batch=images)
        fresh = bool(getattr(handle, "has_new_measurements", False))
        if workload is None or workload == self._workload and not fresh:
            return
        try:
            handle.replan(workload)
        except BudgetError as exc:
            raise GenerationOutOfMemory(f"this request does not fit the VRAM budget: {exc}") from None
        if fresh:
            self._planned.clear()  # measured block times change what batches are worth it
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


def _check_all(jobs: list[Job]) -> None:
    """A batch's step callback: marks the jobs past their deadline; aborts the call only when every job of it
    was given up (the others' images are still wanted)."""
    reasons = []
    for job in jobs:
        try:
            job.check()
        except JobCancelled as exc:
            reasons.append(str(exc))
    if len(reasons) == len(jobs):
        raise JobCancelled(reasons[0])


def _still_wanted(jobs: list[Job]) -> list[Job]:
    """The jobs not given up before their call starts; the others are answered now."""
    wanted = []
    for job in jobs:
        try:
            job.check()
        except JobCancelled as exc:
            _answer(job, exc)
        else:
            wanted.append(job)
    return wanted


def _ids(jobs: list[Job]) -> str:
    return ", ".join(job.request_id for job in jobs)


def _failure(request_ids: str, exc: BaseException) -> Exception:
    """What the callers of a call (``request_ids``, for the log) are told about ``exc``; the details go to the
    log."""
    if isinstance(exc, (JobCancelled, GenerationOutOfMemory, DeliveryError)):
        return exc
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        where = "device" if isinstance(exc, torch.OutOfMemoryError) else "host"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        logger.warning("request %s: out of %s memory: %s", request_ids, where, first)
        # A new exception without the traceback: the old one's frames hold the tensors we want to free.
        return GenerationOutOfMemory(f"out of {where} memory while generating; retry later")
    logger.error("request %s: the pipeline raised", request_ids, exc_info=exc)
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
