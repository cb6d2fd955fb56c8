"""Video jobs, OpenAI-style: created at once, run by the one worker, their files kept in a bounded spool.

A job goes ``queued`` → ``in_progress`` → ``completed`` (its file in the spool) or ``failed`` (its error kept).
Finished jobs are deleted, with their files, after ``video_retention`` seconds; the oldest finished ones go first
when the spool's files pass ``spool_max_bytes`` or the jobs pass ``max_video_jobs``. Nothing is held in memory but
the jobs' records.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .answers import APIError, failure
from .generation import GenerationParams
from .media import VIDEO_FORMATS, write_video
from .schemas import VideoError, VideoObject
from .settings import ServerSettings
from .worker import DeliveryError, Job

logger = logging.getLogger(__name__)


@dataclass
class VideoJob:
    """One video job's record (its worker job, progress, file or error)."""

    id: str
    created_at: int
    params: GenerationParams
    frames: int
    fps: int
    video_format: str
    model: str
    request_id: str = "-"
    job: Job | None = None
    steps_done: int = 0
    steps_total: int | None = None
    path: Path | None = None
    size_bytes: int = 0
    error: APIError | None = None
    finished_at: float | None = None  # time.time() when it completed or failed
    expires: float | None = None  # time.time() when it is deleted

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        if self.path is not None:
            return "completed"
        if self.job is not None and self.job.future.running():
            return "in_progress"
        return "queued"

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")

    def describe(self) -> VideoObject:
        if self.status == "completed":
            progress = 100
        elif self.steps_total:
            progress = min(99, self.steps_done * 100 // self.steps_total)
        else:
            progress = 0
        error = None
        if self.error is not None:
            error = VideoError(
                code=self.error.code or "failed", message=self.error.message, type=self.error.type
            )
        return VideoObject(
            id=self.id,
            created_at=self.created_at,
            completed_at=None if self.finished_at is None else int(self.finished_at),
            expires_at=None if self.expires is None else math.ceil(self.expires),
            model=self.model,
            status=self.status,
            progress=progress,
            steps_done=self.steps_done,
            steps_total=self.steps_total,
            prompt=self.params.prompt,
            seconds=f"{self.frames / self.fps:g}",
            size=f"{self.params.width}x{self.params.height}" if self.params.width else "auto",
            num_frames=self.frames,
            fps=self.fps,
            output_format=self.video_format,
            error=error,
        )


class VideoStore:
    """The video jobs of one server and the spool folder their files live in. Thread-safe: the worker thread
    finishes jobs while the event loop creates, reads and deletes them."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.jobs: OrderedDict[str, VideoJob] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self._spool: Path | None = None
        self._own_spool = False

    @property
    def spool(self) -> Path:
        """The spool folder (made on first use: the one configured, or a temporary one)."""
        with self._lock:
            if self._spool is None:
                if self.settings.spool_dir is not None:
                    self._spool = self.settings.spool_dir
                    self._spool.mkdir(parents=True, exist_ok=True)
                else:
                    self._spool = Path(tempfile.mkdtemp(prefix="vramferry-videos-"))
                    self._own_spool = True
            return self._spool

    def close(self) -> None:
        """Delete every job's file (and the spool folder, when it was made here)."""
        with self._lock:
            records, self.jobs = list(self.jobs.values()), OrderedDict()
            spool, own, self._spool = self._spool, self._own_spool, None
        for record in records:
            _unlink(record.path)
        if spool is not None and own:
            shutil.rmtree(spool, ignore_errors=True)

    def add(self, record: VideoJob) -> None:
        """Remember a new job, deleting old finished ones past the bounds.

        Raises:
            APIError: 429 when ``max_video_jobs`` jobs are all unfinished.
        """
        self.sweep()
        with self._lock:
            while len(self.jobs) >= self.settings.max_video_jobs:
                oldest = next((r for r in self.jobs.values() if r.finished), None)
                if oldest is None:
                    raise APIError(
                        429,
                        f"{self.settings.max_video_jobs} video jobs are unfinished; retry later",
                        type="rate_limit_error",
                        code="too_many_jobs",
                        headers={"Retry-After": "5"},
                    )
                self._forget(oldest)
            self.jobs[record.id] = record

    def get(self, video_id: str) -> VideoJob:
        self.sweep()
        with self._lock:
            record = self.jobs.get(video_id)
        if record is None:
            raise APIError(
                404,
                f"video {video_id!r}: no such job (never made, deleted, or expired after "
                f"{self.settings.video_retention:g} s)",
                type="invalid_request_error",
                param="video_id",
                code="not_found",
            )
        return record

    def listed(self) -> list[VideoJob]:
        self.sweep()
        with self._lock:
            return list(self.jobs.values())

    def remove(self, video_id: str) -> VideoJob:
        """Forget a job and delete its file; the caller cancels its worker job."""
        record = self.get(video_id)
        with self._lock:
            self._forget(record)
        return record

    def sweep(self, now: float | None = None) -> None:
        """Delete the finished jobs past their retention time, then the oldest files past the spool's bound."""
        now = time.time() if now is None else now
        with self._lock:
            for record in [r for r in self.jobs.values() if r.expires is not None and r.expires <= now]:
                self._forget(record)
            self._bound_spool()

    def _bound_spool(self) -> None:
        total = sum(r.size_bytes for r in self.jobs.values())
        files = sorted(
            (r for r in self.jobs.values() if r.path is not None), key=lambda r: r.finished_at or 0.0
        )
        for record in files:  # the longest finished first
            if total <= self.settings.spool_max_bytes:
                break
            total -= record.size_bytes
            logger.info(
                "video %s: deleted to keep the spool within %d bytes",
                record.id,
                self.settings.spool_max_bytes,
            )
            self._forget(record)

    def _forget(self, record: VideoJob) -> None:
        self.jobs.pop(record.id, None)
        _unlink(record.path)

    def writer(self, record: VideoJob) -> Callable[[list[Any]], Path]:
        """The job's ``deliver``: writes its video into the spool (on the worker thread) and records it."""

        def write(outputs: list[Any]) -> Path:
            frames = outputs[0] if outputs and isinstance(outputs[0], list) else outputs
            fmt = VIDEO_FORMATS[record.video_format]
            final = self.spool / f"{record.id}{fmt.suffix}"
            partial = final.with_name(f".{final.name}.part{fmt.suffix}")
            write_video(frames, partial, record.video_format, record.fps)
            size = partial.stat().st_size
            if size > self.settings.spool_max_bytes:
                _unlink(partial)
                raise VideoTooLarge(
                    f"the video is {size} bytes, over the spool's limit of {self.settings.spool_max_bytes}"
                )
            partial.replace(final)  # whole, or not there: a download never sees a file being written
            with self._lock:
                if record.id not in self.jobs:  # deleted while it ran
                    _unlink(final)
                    return final
                record.path, record.size_bytes = final, size
                self._finish(record)
                self._bound_spool()
            return final

        return write

    def on_done(self, record: VideoJob) -> Callable[[Any], None]:
        """The worker job's done callback: records a failure (a success is recorded by :meth:`writer`)."""

        def done(future: Any) -> None:
            if future.cancelled():
                error = APIError(499, "the job was cancelled", type="invalid_request_error", code="cancelled")
            elif future.exception() is not None:
                error = failure(future.exception(), record.request_id)
            else:
                return
            with self._lock:
                record.error = error
                self._finish(record)

        return done

    def _finish(self, record: VideoJob) -> None:
        record.finished_at = time.time()
        record.expires = record.finished_at + self.settings.video_retention


class VideoTooLarge(DeliveryError):
    """A finished video larger than the whole spool."""


def new_video_id() -> str:
    return f"video_{uuid.uuid4().hex}"


def _unlink(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)
