"""Prometheus metrics of one server, in a registry of its own (so several apps can live in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, *LATENCY_BUCKETS[1:])  # batch waits are tens of milliseconds
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class ServerMetrics:
    """Requests by status, latency, queue depth, device memory peaks and weight bytes moved."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vramferry_requests",
            "Image generation requests answered, by HTTP status.",
            ["status"],
            registry=r,
        )
        self.latency = Histogram(
            "vramferry_request_latency_seconds",
            "Time from receiving an image generation request to answering it.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generation = Histogram(
            "vramferry_generation_seconds",
            "Per request: time from the start of its pipeline call (shared in a batch) to its answer.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.waiting = Histogram(
            "vramferry_request_waiting_seconds",
            "Per request: time from being queued to the start of its pipeline call (queue and batch wait).",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vramferry_batch_size",
            "Images per pipeline call (several requests share a call when batched).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.images = Counter("vramferry_images_generated", "Images generated.", registry=r)
        self.videos = Counter("vramferry_videos_generated", "Videos generated.", registry=r)
        self.queue_depth = Gauge("vramferry_queue_depth", "Requests waiting for the worker.", registry=r)
        self.in_progress = Gauge(
            "vramferry_requests_running", "Requests in the pipeline call running now.", registry=r
        )
        self.peak_memory = Gauge(
            "vramferry_peak_memory_bytes",
            "Device memory peak since the server started.",
            ["kind"],
            registry=r,
        )
        self.bytes_moved = Counter(
            "vramferry_weight_bytes_moved",
            "Weight bytes copied host to device by the offload runtime.",
            registry=r,
        )
        self.h2d_gbps = Gauge("vramferry_h2d_gbps", "Achieved host-to-device bandwidth, GB/s.", registry=r)
        self._peaks = {"allocated": 0, "reserved": 0}
        for kind in self._peaks:
            self.peak_memory.labels(kind=kind).set(0)
        self._last_bytes = 0
        self.last_stats: dict[str, Any] = {}  # the runtime's counters after the last request (for /v1/status)

    def observe_request(self, status: int, seconds: float) -> None:
        self.requests.labels(status=str(status)).inc()
        self.latency.observe(seconds)

    def observe_memory(self, allocated: int, reserved: int) -> None:
        """Raise the peaks to these values where they are higher."""
        for kind, value in (("allocated", allocated), ("reserved", reserved)):
            self._peaks[kind] = max(self._peaks[kind], int(value))
            self.peak_memory.labels(kind=kind).set(self._peaks[kind])

    def observe_stats(self, stats: Any) -> None:
        """Take the offload runtime's cumulative counters (an ``OffloadStats``)."""
        data = stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)
        self.last_stats = data
        moved = int(data.get("bytes_h2d", 0))
        # The runtime's counter is cumulative and may be reset; count only what is new.
        delta = moved - self._last_bytes if moved >= self._last_bytes else moved
        if delta > 0:
            self.bytes_moved.inc(delta)
        self._last_bytes = moved
        self.h2d_gbps.set(float(data.get("h2d_gbps", 0.0)))
        self.observe_memory(int(data.get("peak_allocated", 0)), int(data.get("peak_reserved", 0)))

    @property
    def peaks(self) -> dict[str, int]:
        """The device memory peaks seen so far (``allocated``, ``reserved``), in bytes."""
        return dict(self._peaks)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def replicas(self) -> list[str] | None:
        """The replicas these metrics cover, when several serve one endpoint; ``None`` for a single server."""
        return None
