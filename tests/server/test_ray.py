"""Ray Serve replicas: the pieces on their own, then ``vramferry serve --replicas 2`` on a local Ray cluster.

The cluster test is bounded everywhere (start, every request, shutdown) and stops what it started in a
``finally``: the server by SIGTERM (then SIGKILL), and any Ray process of its left behind, by pid.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_fakes import FakePipeline
from starlette.testclient import TestClient

from vramferry.server import ServerSettings, create_app
from vramferry.server.metrics import ServerMetrics
from vramferry.server.ray import (
    REPLICA_HEADER,
    MetricsBoard,
    ReplicaHeader,
    ReplicaMetrics,
    merge_metrics,
    replica_options,
)

BODY = {"prompt": "x", "size": "64x64", "num_inference_steps": 2}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- without a cluster -----------------------------------------------------------------------------------------


def test_importing_vramferry_and_its_server_does_not_import_ray():
    code = (
        "import sys, vramferry, vramferry.cli, vramferry.server.ray, vramferry.server.app; "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def _counts(text: bytes) -> dict[tuple[str, str], float]:
    return {
        (s.labels["replica"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if s.name == "vramferry_requests_total"
    }


def test_merged_metrics_label_every_sample_with_its_replica():
    first, second = ServerMetrics(), ServerMetrics()
    first.observe_request(200, 0.1)
    first.observe_request(200, 0.2)
    second.observe_request(429, 0.01)
    merged = merge_metrics({"a": first.render(), "b": second.render().decode()})
    assert _counts(merged) == {("a", "200"): 2.0, ("b", "429"): 1.0}
    text = merged.decode()
    assert text.count("# TYPE vramferry_requests_total counter") == 1  # one family, both replicas' samples
    assert (
        'vramferry_queue_depth{replica="a"} 0.0' in text and 'vramferry_queue_depth{replica="b"} 0.0' in text
    )


def test_an_app_given_replica_metrics_serves_them_labelled_with_the_replica():
    metrics = ReplicaMetrics("r1")  # not reporting: no cluster here, so only its own numbers
    app = create_app(FakePipeline(), settings=ServerSettings(), metrics=metrics)
    with TestClient(app) as client:
        assert client.post("/v1/images/generations", json=BODY).status_code == 200
        assert client.post("/v1/images/generations", json={**BODY, "size": "65x64"}).status_code == 400
        text = client.get("/metrics").content
        health = client.get("/health").json()
    assert _counts(text) == {("r1", "200"): 1.0, ("r1", "400"): 1.0}
    assert health == {"status": "ok", "replicas": ["r1"]}
    # What it reports to the board has no replica label (the merge adds it, once).
    assert 'vramferry_requests_total{status="200"} 1.0' in metrics.own().decode()


def test_the_board_returns_live_replicas_and_drops_silent_and_stopped_ones():
    board = MetricsBoard(stale_after=0.2)
    assert board.report("a", b"x") == {"a": b"x"}
    assert board.report("b", b"y") == {"a": b"x", "b": b"y"}
    time.sleep(0.3)
    assert board.report("b", b"z") == {"b": b"z"}  # a fell silent
    board.forget("b")
    assert board.report("c", b"w") == {"c": b"w"}


def test_replica_options_without_and_with_autoscaling():
    assert replica_options(None, None, None) == {"num_replicas": 1}
    assert replica_options(3, None, None) == {"num_replicas": 3}
    scaling = replica_options(2, 1, 4)["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["initial_replicas"], scaling["max_replicas"]) == (1, 2, 4)
    scaling = replica_options(None, 0, 3)["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["initial_replicas"], scaling["max_replicas"]) == (0, 1, 3)


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ((0, None, None), "replicas: expected a whole number ≥ 1, got 0"),
        ((None, 3, 2), r"min_replicas \(3\) is above max_replicas \(2\)"),
        ((5, 1, 4), r"replicas \(5\) is outside min_replicas \(1\) to max_replicas \(4\)"),
        ((True, None, None), "replicas: expected a whole number"),
    ],
)
def test_replica_options_name_bad_counts(counts, message):
    with pytest.raises(ValueError, match=message):
        replica_options(*counts)


def test_the_replica_header_names_the_replica_on_every_answer_refusals_included():
    app = create_app(FakePipeline(), settings=ServerSettings(api_key="secret", max_queue=2))
    app.add_middleware(ReplicaHeader, replica="r1")
    with TestClient(app) as client:
        refused = client.post("/v1/images/generations", json=BODY)
        auth = {"Authorization": "Bearer secret"}
        served = client.post(
            "/v1/images/generations", json=BODY, headers={**auth, "X-Request-Id": "ray-id-1"}
        )
        own = client.post("/v1/images/generations", json=BODY, headers={**auth, "X-Request-Id": "bad id\t"})
    assert refused.status_code == 401 and refused.headers[REPLICA_HEADER] == "r1"
    assert served.status_code == 200 and served.headers[REPLICA_HEADER] == "r1"
    # Ray's proxy sends its own X-Request-Id back: the app's copy of the same id is not repeated.
    assert "x-request-id" not in served.headers
    # An id that is not a plain token is not taken: the app names the request itself.
    assert re.fullmatch(r"[0-9a-f]{32}", own.headers["x-request-id"])


def test_deployment_returns_a_bound_application_and_names_bad_arguments():
    serve = pytest.importorskip("ray.serve", reason="the 'ray' extra is not installed")
    from vramferry.config import OffloadConfig
    from vramferry.server.ray import deployment

    application = deployment(config=OffloadConfig(mode="none"), replicas=2, num_gpus=0)
    assert isinstance(application, serve.Application)
    with pytest.raises(ValueError, match="config: expected an OffloadConfig or a dict, got str"):
        deployment(config="auto")
    with pytest.raises(ValueError, match="settings: expected a ServerSettings, got dict"):
        deployment(settings={"max_queue": 2})
    with pytest.raises(ValueError, match=r"min_replicas \(2\) is above max_replicas \(1\)"):
        deployment(min_replicas=2, max_replicas=1)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "0"], "--replicas: expected a number ≥ 1, got 0"),
        (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 is above --max-replicas 2"),
        (["--replicas", "4", "--max-replicas", "2"], "--replicas 4 is outside --min-replicas/--max-replicas"),
    ],
)
def test_serve_names_bad_replica_flags_before_anything_starts(flags, message, capsys):
    from vramferry.cli import main

    try:
        code = main(["serve", "--onload-device", "cpu", *flags])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


# -- two demo replicas on a local Ray cluster --------------------------------------------------------------------

START_TIMEOUT = 300  # a local cluster and two replicas on 2 busy CPU cores: about a minute
REQUEST_TIMEOUT = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(condition, timeout: float, what: str, server):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(
                f"the server exited with {server.process.returncode} while waiting for {what}: "
                + server.output()[-2000:]
            )
        try:
            value = condition()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _replica_counts(base: str) -> dict[tuple[str, str], float]:
    return _counts(httpx.get(f"{base}/metrics", timeout=10).content)


def _burst(base: str, seeds: range, steps: int = 2) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(seeds))
        async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT, limits=limits) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/v1/images/generations", json={**BODY, "num_inference_steps": steps, "seed": s}
                    )
                    for s in seeds
                ),
                return_exceptions=True,
            )

    return asyncio.run(run())


def _check_burst(responses: list, seeds: range) -> Counter:
    """Every request answered once, 200 or 429; distinct images; the replicas that served, counted."""
    assert len(responses) == len(seeds)
    errors = [r for r in responses if isinstance(r, Exception)]
    assert not errors, errors[:3]
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, [r.text[:200] for r in responses if r.status_code not in (200, 429)]
    ok = [r for r in responses if r.status_code == 200]
    assert ok, "no request was served"
    digests = {hashlib.sha256(base64.b64decode(r.json()["data"][0]["b64_json"])).hexdigest() for r in ok}
    assert len(digests) == len(ok)  # one image per seed: no answer given twice
    ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(ids)) == len(ids) and all("," not in i for i in ids)  # one id each, sent once
    return Counter(r.headers.get(REPLICA_HEADER) for r in ok)


class ReplicaServer:
    """``vramferry serve --replicas N`` in a subprocess on a free port, its output in a file."""

    def __init__(self, flags: list[str], log_path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "vramferry", "serve", "--port", str(self.port), *flags]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS="")
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.started: dict[
            int, object
        ] = {}  # pid -> psutil.Process: every Ray process seen, to stop them all

    def wait_ready(self, replicas: int) -> set[str]:
        """Wait for /health, then for ``replicas`` replicas in /metrics; their ids."""
        _wait(
            lambda: httpx.get(f"{self.base}/health", timeout=5).status_code == 200,
            START_TIMEOUT,
            "/health",
            self,
        )
        found = _wait(
            lambda: _if_count(_metrics_replicas(self.base), replicas),
            60,
            f"{replicas} replicas in /metrics",
            self,
        )
        self.note_processes()
        return found

    def note_processes(self) -> list:
        import psutil

        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        self.started.update((p.pid, p) for p in children)
        return children

    def replica_processes(self) -> list:
        return [p for p in self.note_processes() if "ServeReplica" in " ".join(p.cmdline())]

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; then every Ray process of its still running, by pid."""
        import psutil

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for process in self.started.values():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def test_two_demo_replicas_share_the_load_survive_a_killed_replica_and_stop_on_sigterm(tmp_path):
    pytest.importorskip("ray.serve", reason="the 'ray' extra is not installed")
    psutil = pytest.importorskip("psutil")
    flags = ["--replicas", "2", "--offload", "none", "--max-queue", "4", "--timeout", str(REQUEST_TIMEOUT)]
    server = ReplicaServer(flags, tmp_path / "serve.log")
    try:
        replicas = server.wait_ready(2)
        base = server.base
        served: Counter = Counter()
        seen: Counter = Counter()
        for burst in range(3):  # the router picks the less busy of two: both serve a burst of 16 at once
            seeds = range(16 * burst, 16 * burst + 16)
            responses = _burst(base, seeds)
            served += _check_burst(responses, seeds)
            seen.update(str(r.status_code) for r in responses)
            if set(served) == replicas:
                break
        assert set(served) == replicas, served
        # /metrics: every replica's counters, labelled; the sums are what the clients saw.
        _wait(lambda: _totals(base) == dict(seen), 10, f"/metrics to count {dict(seen)}", server)
        # /health, from whichever replica answers: every replica that reported.
        _wait(
            lambda: set(httpx.get(f"{base}/health", timeout=10).json().get("replicas", ())) == replicas,
            10,
            f"/health to list {sorted(replicas)}",
            server,
        )

        replica_processes = server.replica_processes()
        assert len(replica_processes) == 2
        in_flight = _burst_in_background(base, range(1000, 1008), steps=8)
        time.sleep(0.5)
        replica_processes[0].kill()
        answered = in_flight()
        assert all(not isinstance(r, Exception) for r in answered), answered  # answered, even if 500
        following = [
            httpx.post(
                f"{base}/v1/images/generations", json={**BODY, "seed": 2000 + i}, timeout=REQUEST_TIMEOUT
            )
            for i in range(6)
        ]
        assert [r.status_code for r in following] == [200] * 6, [r.text[:200] for r in following]

        running = server.note_processes()  # the replacement replica Ray started included
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(90) == 0
        _wait_gone(running, 30, psutil)
    finally:
        server.stop()
    assert "Traceback" not in server.output(), server.output()[-3000:]


@pytest.mark.gpu
def test_two_replicas_each_plan_and_run_on_a_gpu_of_their_own(tmp_path):
    pytest.importorskip("ray.serve", reason="the 'ray' extra is not installed")
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    server = ReplicaServer(
        ["--replicas", "2", "--offload", "auto", "--max-queue", "8"], tmp_path / "serve.log"
    )
    try:
        replicas = server.wait_ready(2)
        served: Counter = Counter()
        for burst in range(3):
            seeds = range(16 * burst, 16 * burst + 16)
            served += _check_burst(_burst(server.base, seeds, steps=4), seeds)
            if set(served) == replicas:
                break
        assert set(served) == replicas, served
        time.sleep(1.0)  # the replicas' metrics reach the board every 0.5 s
        text = httpx.get(f"{server.base}/metrics", timeout=10).text
        peaks = {
            s.labels["replica"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "vramferry_peak_memory_bytes" and s.labels["kind"] == "allocated"
        }
        assert set(peaks) == replicas and all(peak > 0 for peak in peaks.values()), peaks  # both ran on CUDA
    finally:
        server.stop()


def _metrics_replicas(base: str) -> set[str]:
    """The replicas that ``/metrics`` lists (every replica reports its queue depth)."""
    return {
        s.labels["replica"]
        for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text)
        for s in family.samples
        if s.name == "vramferry_queue_depth"
    }


def _totals(base: str) -> dict[str, float]:
    """Requests answered, by status, summed over the replicas."""
    totals: Counter = Counter()
    for (_, status), value in _replica_counts(base).items():
        totals[status] += value
    return dict(totals)


def _if_count(replicas: set[str], count: int) -> set[str] | None:
    return replicas if len(replicas) == count else None


def _burst_in_background(base: str, seeds: range, steps: int):
    """Start a burst in a thread; returns what waits for its answers (bounded)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    future = pool.submit(_burst, base, seeds, steps)

    def answers() -> list:
        try:
            return future.result(timeout=REQUEST_TIMEOUT + 30)
        finally:
            pool.shutdown(wait=False)

    return answers


def _wait_gone(processes: list, timeout: float, psutil) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in processes if _running(p, psutil)]
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"Ray processes left running after SIGTERM: {[(p.pid, p.name()) for p in alive]}")


def _running(process, psutil) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_replica_refuses_a_size_its_pipeline_cannot_make_before_offloading():
    from vramferry.server.ray import load_replica, replica_spec

    spec = replica_spec(None, {"mode": "none", "onload_device": "cpu"}, None, sizes=[(100, 100)])
    with pytest.raises(
        ValueError, match="sizes: 100x100: FluxPipeline makes sizes whose sides are multiples of 16"
    ):
        load_replica(spec)
