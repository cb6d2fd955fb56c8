"""A page to try the server (``GET /``: static HTML, CSS and JavaScript; no build step) and the JSON status it
shows (``GET /v1/status``: what is served, the live plan, bytes moved, bandwidth, peak memory, the queue).

The page holds no data of its own and needs no API key to load; it calls the same API as any client (sending the
key the user types, kept in the browser's local storage, when the server has one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.staticfiles import StaticFiles

from .generation import is_video_pipeline
from .media_routes import EDITS_PATH, VIDEOS_PATH
from .plans import plan_summaries
from .schemas import ERROR_RESPONSES, PlanSummary

STATIC = Path(__file__).with_name("static")
# The page loads only its own files; pictures and videos come back as data: and blob: URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def is_page_path(path: str) -> bool:
    """The page's paths, served without the API key: the page has nothing to hide; the API it calls does."""
    return path == "/" or path.startswith("/static/")


class QueueStatus(BaseModel):
    waiting: int = Field(description="Requests and jobs waiting for the worker.")
    running: int = Field(description="Requests in the pipeline call running now (several when batched).")
    max_queue: int


class OffloadStatus(BaseModel):
    """The offload runtime's counters after the last request (cumulative since the server started)."""

    mode: str
    bytes_h2d: int = Field(description="Weight bytes copied host to device.")
    h2d_gbps: float = Field(description="Achieved host-to-device bandwidth, GB/s.")
    wait_seconds: float = Field(description="Time compute waited for weights.")
    peak_allocated: int
    peak_reserved: int


class ServerStatus(BaseModel):
    object: Literal["status"] = "status"
    model: str
    kind: Literal["image", "video"] = Field(description="What the served pipeline makes.")
    pipeline: str = Field(description="The served pipeline's class.")
    routes: list[str] = Field(description="The generation routes served.")
    offload_mode: str = Field(description="The offload mode applied ('none' without offload).")
    default_size: str | None = None
    default_steps: int | None = None
    size_multiple: int
    min_size: int
    max_size: int
    queue: QueueStatus
    offload: OffloadStatus | None = Field(
        default=None, description="None without offload, or before any request."
    )
    peak_memory: dict[str, int] = Field(description="Device memory peaks since start, in bytes (0 on CPU).")
    plans: list[PlanSummary] = Field(description="As GET /v1/plans: where the weights go, per request shape.")


def install_page(app: FastAPI, pipeline: Any, multiple: int) -> None:
    """Add ``GET /``, its static files and ``GET /v1/status``."""
    settings, worker, metrics = app.state.settings, app.state.worker, app.state.metrics
    kind = "video" if is_video_pipeline(pipeline) else "image"
    routes = ["/v1/images/generations"]
    routes += [path for path in (EDITS_PATH, VIDEOS_PATH) if path not in app.state.unserved]

    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    async def status() -> ServerStatus:
        stats = metrics.last_stats
        offload = None
        if stats:
            offload = OffloadStatus(
                **{name: stats.get(name, 0) for name in OffloadStatus.model_fields if name != "mode"},
                mode=str(stats.get("mode", "none")),
            )
        size = settings.default_size
        config = getattr(worker.handle, "config", None)
        mode = getattr(getattr(config, "mode", None), "value", None) or str(stats.get("mode", "none"))
        return ServerStatus(
            offload_mode=mode,
            model=settings.model_name,
            kind=kind,
            pipeline=type(pipeline).__name__,
            routes=routes,
            default_size=f"{size[0]}x{size[1]}" if size else None,
            default_steps=settings.default_steps,
            size_multiple=multiple,
            min_size=settings.min_size,
            max_size=settings.max_size,
            queue=QueueStatus(waiting=worker.waiting, running=worker.running, max_queue=settings.max_queue),
            offload=offload,
            peak_memory=metrics.peaks,
            plans=plan_summaries(worker.handle),
        )

    app.get("/", include_in_schema=False)(page)
    app.get("/v1/status", response_model=ServerStatus, responses={401: ERROR_RESPONSES[401]})(status)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
