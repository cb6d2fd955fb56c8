"""The server as Ray Serve replicas: one model behind one endpoint, served from many GPUs and machines.

Every replica runs the app of :func:`vramferry.server.create_app` (the same routes, validation, error format,
API key and Host rules as ``vramferry serve``), on a pipeline it loads and offloads itself, planned for its own
GPU's memory (Ray gives each replica one GPU, seen as ``cuda:0``; on a cluster without GPUs, CPU replicas).

- Back-pressure: each replica's worker queue answers 429 (``queue_full``) when full; Ray Serve sends a request to
  the less busy of two replicas, so a 429 means the replicas it chose were full. Requests that Ray itself cannot
  place (every replica at ``max_ongoing_requests``, and ``max_queued_requests`` waiting at the proxy) get Ray's
  429 too.
- Health: Ray calls each replica's ``check_health`` and replaces one whose worker has stopped; ``/health``
  answers from a healthy replica and lists the replicas that reported within the last minute.
- ``/metrics`` renders every replica's metrics, each sample labelled ``replica``: replicas share them through
  a deployment-scoped actor (:class:`MetricsBoard`) that they report to every :data:`REPORT_PERIOD_S` seconds.
- Every answer names the replica that gave it in the ``X-Vramferry-Replica`` header.

Importing this module does not import Ray; :func:`deployment` and :func:`run` do.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .app import REQUEST_ID_HEADER, ServerSettings, create_app
from .metrics import ServerMetrics

logger = logging.getLogger(__name__)

REPLICA_HEADER = "X-Vramferry-Replica"
REPLICA_LABEL = "replica"
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
BOARD = "metrics_board"  # the deployment-scoped actor's name
REPORT_PERIOD_S = 0.5  # how often a replica reports its metrics and reads the others'
STALE_AFTER_S = 60.0  # a replica silent for longer (stopped, killed) leaves /metrics
CONSTRUCTOR_RETRIES = 2  # a replica that cannot load its model fails the deployment soon, not after 20 tries
HEADROOM = 4  # requests a replica takes beyond its queue: room for /health and /metrics when it is full
PROXY_QUEUE = 256  # requests a proxy holds while it routes them (a burst waits a moment); beyond, Ray's 429


class DeployError(RuntimeError):
    """The replicas did not start (the message is the replicas' own error, as Ray reports it)."""


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica loads and serves (plain data: it travels to the replicas by pickle)."""

    model: str | None
    config: Mapping[str, Any]
    settings: ServerSettings
    dtype: str | None = None
    lora: tuple[tuple[str, str], ...] = ()
    sizes: tuple[tuple[int, int], ...] = ()


# -- metrics of every replica ----------------------------------------------------------------------------------


def merge_metrics(texts: Mapping[str, bytes | str]) -> bytes:
    """One Prometheus exposition of several replicas' ``/metrics``, each sample labelled ``replica``.

    Args:
        texts: replica id → that replica's exposition text (as :meth:`ServerMetrics.render` gives it).

    Returns:
        The text exposition: each metric family once, with every replica's samples.
    """
    families: dict[str, Metric] = {}
    for replica in sorted(texts):
        text = texts[replica]
        text = text.decode() if isinstance(text, bytes) else text
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            for sample in family.samples:
                labels = {**sample.labels, REPLICA_LABEL: replica}
                merged.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)

    class _Merged:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


class MetricsBoard:
    """Holds each replica's latest metrics text (a Ray actor, shared by the replicas of one deployment)."""

    def __init__(self, stale_after: float = STALE_AFTER_S) -> None:
        self.stale_after = stale_after
        self.texts: dict[str, tuple[float, bytes]] = {}

    def report(self, replica: str, text: bytes) -> dict[str, bytes]:
        """Store ``replica``'s text; return every live replica's (``replica``'s own included)."""
        now = time.monotonic()
        self.texts[replica] = (now, text)
        self.texts = {r: (t, m) for r, (t, m) in self.texts.items() if now - t <= self.stale_after}
        return {r: m for r, (_, m) in self.texts.items()}

    def forget(self, replica: str) -> None:
        self.texts.pop(replica, None)


class ReplicaMetrics(ServerMetrics):
    """A replica's metrics; :meth:`render` gives every replica's (its own fresh, the others' as last reported).

    A daemon thread reports this replica's metrics to the board and reads the others' every ``period`` seconds,
    so that rendering never waits on another process.
    """

    def __init__(self, replica: str, board: Any = None, period: float = REPORT_PERIOD_S) -> None:
        super().__init__()
        self.replica, self.period = replica, period
        self._board = board  # an actor handle; None: looked up (again) on the next report
        self._others: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def own(self) -> bytes:
        """This replica's metrics alone, without the ``replica`` label."""
        return super().render()

    def render(self) -> bytes:
        return merge_metrics({**self._others, self.replica: self.own()})

    def replicas(self) -> list[str]:
        """This replica and those that reported to the board within its staleness window."""
        return sorted({self.replica, *self._others})

    def start_reporting(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._report_loop, name="vramferry-metrics", daemon=True)
            self._thread.start()

    def stop_reporting(self) -> None:
        self._stop.set()
        board = self._board
        if board is not None:
            try:
                board.forget.remote(self.replica)
            except Exception as exc:  # the cluster is going away: the board goes with it
                logger.debug("replica %s: not removed from the metrics board (%s)", self.replica, exc)

    def _report_loop(self) -> None:
        import ray

        while not self._stop.wait(self.period):
            try:
                board = self._board if self._board is not None else _board()
                texts = ray.get(board.report.remote(self.replica, self.own()), timeout=10)
            except Exception as exc:  # the board is being replaced, or the cluster is going away
                logger.debug("replica %s: metrics not reported (%s)", self.replica, exc)
                self._board = None
                continue
            self._board = board
            self._others = {r: t for r, t in texts.items() if r != self.replica}


def _board() -> Any:
    from ray import serve

    return serve.get_deployment_actor(BOARD)


# -- the replica ----------------------------------------------------------------------------------------------


class ReplicaHeader:
    """ASGI middleware in front of a replica's app: names the replica in every answer (``X-Vramferry-Replica``)
    and gives the app Ray's request id, so that the server's log, its error messages and the one
    ``X-Request-Id`` header that Ray's proxy sends back all name the request alike."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.replica = app, replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        ours = bool(_REQUEST_ID.fullmatch(rid))  # the client may have sent it: only a plain id is taken
        if ours:
            scope["state"] = {**scope.get("state", {}), "request_id": rid}

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if ours:
                    del headers[REQUEST_ID_HEADER]  # Ray's proxy adds the same id
                headers.append(REPLICA_HEADER, self.replica)
            await send(message)

        await self.app(scope, receive, send_named)


def load_replica(spec: ReplicaSpec) -> tuple[Any, Any]:
    """The pipeline of ``spec``, LoRA adapters loaded, offloaded on this process's device; ``(pipeline, handle)``.

    CUDA requested where there is none (a CPU replica) runs on the CPU.
    """
    import torch

    from ..config import OffloadConfig
    from ..loader import load
    from ..planning.workload import Workload
    from .generation import size_multiple
    from .lora import load_lora_adapters

    config = OffloadConfig.from_dict(spec.config)
    if config.device.type == "cuda" and not torch.cuda.is_available():
        logger.info("no CUDA device in this replica: running on the CPU")
        config = config.replace(onload_device="cpu")

    def prepare(pipeline: Any) -> None:
        # Before the weights are packed: the adapters are packed with them, and a bad size is refused unread.
        if spec.lora:
            load_lora_adapters(pipeline, [(name, path) for name, path in spec.lora])
        multiple = size_multiple(pipeline)
        for width, height in spec.sizes:
            if width % multiple or height % multiple:
                raise ValueError(
                    f"sizes: {width}x{height}: {type(pipeline).__name__} makes sizes whose sides are multiples "
                    f"of {multiple}"
                )

    handle = load(spec.model, config, dtype=spec.dtype, prepare=prepare)
    pipeline = handle.pipeline
    if spec.sizes and str(config.mode) == "auto":
        steps = spec.settings.default_steps or handle.workload.steps
        handle.prepare([Workload(height=h, width=w, steps=steps) for w, h in spec.sizes])
    elif spec.sizes:
        logger.warning("sizes are planned only in auto mode (this replica runs %s); ignored", config.mode)
    return pipeline, handle


class VramferryReplica:
    """One Ray Serve replica: the pipeline of a :class:`ReplicaSpec` and the app serving it.

    Ray builds it with :func:`deployment`; its ASGI app is :meth:`__serve_build_asgi_app__`'s.
    """

    def __init__(self, spec: ReplicaSpec) -> None:
        from ray import serve

        self.replica = serve.get_replica_context().replica_id.unique_id
        self.pipeline, self.handle = load_replica(spec)
        self.metrics = ReplicaMetrics(self.replica)
        # Not ``self.app``: Ray's ingress wrapper owns that name.
        self.server = create_app(self.pipeline, self.handle, spec.settings, metrics=self.metrics)
        self.server.add_middleware(ReplicaHeader, replica=self.replica)  # outermost: refusals are named too
        self.metrics.start_reporting()
        logger.info("replica %s ready (%s)", self.replica, spec.model or "the demo pipeline")

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self.server

    def check_health(self) -> None:
        """Ray's health check: a replica whose worker thread has stopped is replaced."""
        if self.server.state.worker.dead:
            raise RuntimeError(f"replica {self.replica}: the generation worker has stopped")

    def __del__(self) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.stop_reporting()


# -- building and running the deployment ------------------------------------------------------------------------


def deployment(
    model: str | None = None,
    config: Any = None,
    *,
    settings: ServerSettings | None = None,
    dtype: str | None = None,
    lora: Sequence[tuple[str, Any]] = (),
    sizes: Sequence[tuple[int, int]] = (),
    replicas: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    num_gpus: float | None = None,
    name: str = "vramferry",
) -> Any:
    """A bound Ray Serve deployment of the image server, for ``serve.run`` or a Ray Serve app of your own.

    Args:
        model: a diffusers pipeline folder or Hub id, loaded by every replica (a folder must exist on every
            node); ``None`` for the built-in demo pipeline.
        config: the ``OffloadConfig`` (or its dict) each replica applies, on its own GPU; ``None`` for the
            defaults (``auto``, planned for the replica's GPU memory).
        settings: the server's :class:`ServerSettings` (its ``max_queue`` is each replica's queue).
        dtype: the weights' dtype (``float16``, ``bfloat16``, ...); ``None`` keeps the model's.
        lora: ``(name, path)`` LoRA adapters each replica loads before offload.
        sizes: ``(width, height)`` request sizes each replica plans at start (``auto`` mode).
        replicas: how many replicas (default 1); with autoscaling, how many to start with.
        min_replicas, max_replicas: Ray Serve's autoscaling bounds; either one turns autoscaling on, scaling on
            the requests each replica has ongoing (see :func:`replica_options` for the defaults).
        num_gpus: GPUs per replica; ``None``: 1 where the cluster (or, before ``ray.init``, this machine) has
            GPUs, else 0 (CPU replicas).
        name: the deployment's name.

    Returns:
        A ``ray.serve.Application`` (``deployment.bind(...)``).

    Raises:
        ValueError: bad replica counts, or settings that are not a :class:`ServerSettings`.
        ImportError: Ray Serve is not installed (the ``ray`` extra).
    """
    spec = replica_spec(model, config, settings, dtype=dtype, lora=lora, sizes=sizes)
    scaling = replica_options(replicas, min_replicas, max_replicas)
    serve, DeploymentActorConfig = _import_serve()
    from ray.serve.config import BackpressureConfig

    gpus = _gpus_per_replica() if num_gpus is None else num_gpus
    return serve.deployment(
        serve.ingress()(VramferryReplica),
        name=name,
        ray_actor_options={"num_gpus": gpus, "num_cpus": 1},
        # The worker's own queue answers 429 first (a call runs up to max_batch requests, at least one); the
        # headroom leaves /health and /metrics a way in.
        max_ongoing_requests=spec.settings.max_queue + spec.settings.max_batch + HEADROOM,
        max_queued_requests=PROXY_QUEUE,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        health_check_period_s=5,
        max_constructor_retry_count=CONSTRUCTOR_RETRIES,
        graceful_shutdown_timeout_s=min(spec.settings.timeout, 60),
        deployment_actors=[
            DeploymentActorConfig(
                name=BOARD, actor_class=_remote(MetricsBoard), actor_options={"num_cpus": 0}
            )
        ],
        **scaling,
    ).bind(spec)


def replica_spec(
    model: str | None,
    config: Any,
    settings: ServerSettings | None,
    *,
    dtype: str | None = None,
    lora: Sequence[tuple[str, Any]] = (),
    sizes: Sequence[tuple[int, int]] = (),
) -> ReplicaSpec:
    """The :class:`ReplicaSpec` of :func:`deployment`'s arguments, checked (``ValueError`` naming the argument)."""
    from ..config import OffloadConfig

    settings = settings if settings is not None else ServerSettings()
    if not isinstance(settings, ServerSettings):
        raise ValueError(f"settings: expected a ServerSettings, got {type(settings).__name__}")
    if config is None:
        config = OffloadConfig()
    elif isinstance(config, Mapping):
        config = OffloadConfig.from_dict(config)
    elif not isinstance(config, OffloadConfig):
        raise ValueError(f"config: expected an OffloadConfig or a dict, got {type(config).__name__}")
    return ReplicaSpec(
        model=None if model is None else str(model),
        config=config.to_dict(),
        settings=settings,
        dtype=dtype,
        lora=tuple((str(n), str(p)) for n, p in lora),
        sizes=tuple((int(w), int(h)) for w, h in sizes),
    )


def replica_options(
    replicas: int | None, min_replicas: int | None, max_replicas: int | None
) -> dict[str, Any]:
    """``num_replicas`` or ``autoscaling_config`` for ``serve.deployment``, the counts checked.

    Without bounds: ``replicas`` (default 1) replicas. With either bound: autoscaling from ``replicas`` (default:
    the lower bound) between ``min_replicas`` (default: ``replicas``, else 1) and ``max_replicas`` (default: the
    larger of the others).
    """
    for flag, value in (
        ("replicas", replicas),
        ("min_replicas", min_replicas),
        ("max_replicas", max_replicas),
    ):
        least = 0 if flag == "min_replicas" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"{flag}: expected a whole number ≥ {least}, got {value!r}")
    if min_replicas is None and max_replicas is None:
        return {"num_replicas": 1 if replicas is None else replicas}
    low = min_replicas if min_replicas is not None else (replicas if replicas is not None else 1)
    high = max_replicas if max_replicas is not None else max(low, replicas or 1)
    if low > high:
        raise ValueError(f"min_replicas ({low}) is above max_replicas ({high})")
    start = max(low, 1) if replicas is None else replicas
    if not low <= start <= high:
        raise ValueError(f"replicas ({start}) is outside min_replicas ({low}) to max_replicas ({high})")
    return {
        "autoscaling_config": {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": start,
            "target_ongoing_requests": 1,  # a replica runs one request at a time; more wait
        }
    }


def _import_serve() -> tuple[Any, Any]:
    try:
        from ray import serve
        from ray.serve.config import DeploymentActorConfig
    except ImportError as exc:
        raise ImportError(
            f"Ray Serve replicas need 'ray[serve]>=2.60' ({exc}); install the 'ray' extra: "
            "pip install 'vramferry[ray]'"
        ) from exc
    return serve, DeploymentActorConfig


def _remote(cls: type) -> Any:
    import ray

    return ray.remote(cls)


def _gpus_per_replica() -> int:
    import ray

    if ray.is_initialized():
        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    import torch

    return 1 if torch.cuda.is_available() else 0


def run(
    application: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8091,
    address: str | None = None,
    name: str = "vramferry",
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
) -> None:
    """Serve ``application`` (from :func:`deployment`) on Ray Serve at ``host:port`` until SIGTERM, SIGINT or
    ``stop``.

    Args:
        address: a running Ray cluster to join (``"auto"``, ``"10.0.0.1:6379"``: what ``ray.init`` takes); the
            app is deleted from it on exit, the cluster left running. ``None``: start a local cluster (or join
            the one ``RAY_ADDRESS`` names), shut down on exit.
        stop, ready: for callers that drive it from another thread: set ``stop`` to end; ``ready`` is set once
            every replica serves. Signal handlers are installed only on the main thread.

    Raises:
        DeployError: the application failed to deploy (naming the replicas' error).
    """
    import os

    import ray
    from ray import serve

    stop = stop or threading.Event()
    local = address is None and not os.environ.get("RAY_ADDRESS")
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    restore = _on_signals(stop)  # after ray.init, which installs handlers of its own
    try:
        serve.start(http_options={"host": host, "port": port})
        _deploy(application, name)
        logger.info("serving on http://%s:%d (Ray Serve application %r)", host, port, name)
        if ready is not None:
            ready.set()
        stop.wait()
    finally:
        restore()
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(name)
        finally:
            ray.shutdown()


def _deploy(application: Any, name: str) -> None:
    """``serve.run``, with the replicas' own error in the message when they fail to start."""
    from ray import serve

    try:
        serve.run(application, name=name, route_prefix="/", blocking=False)
    except RuntimeError as exc:
        status = serve.status().applications.get(name)
        details = [d.message for d in status.deployments.values() if d.message] if status else []
        lines = [line for text in details for line in text.strip().splitlines() if line.strip()]
        raise DeployError(f"the replicas failed to start: {lines[-1] if lines else exc}") from None


def _on_signals(stop: threading.Event) -> Any:
    """Set ``stop`` on SIGTERM and SIGINT (main thread only); returns what puts the old handlers back."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
