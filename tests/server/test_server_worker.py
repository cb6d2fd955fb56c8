"""The worker behind the API: queue limit (429), timeouts (504), OOM (503), failures (500), any exception the
pipeline raises, and metrics."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from live import wait_until
from server_fakes import FailingOnce, FakeHandle, FakePipeline

from vramferry.server import ServerSettings, create_app

BODY = {"prompt": "x", "size": "64x64", "num_inference_steps": 2}


def _run_concurrently(app, scenario):
    """Run ``scenario(client)`` against ``app`` on one event loop, so requests overlap."""

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            try:
                return await scenario(client)
            finally:
                app.state.worker.stop()

    return asyncio.run(main())


def test_full_queue_is_429_and_the_rest_are_served():
    gate = threading.Event()
    pipeline = FakePipeline(gate)
    app = create_app(pipeline, settings=ServerSettings(max_queue=1, timeout=30))
    worker = app.state.worker

    async def scenario(client):
        post = lambda: client.post("/v1/images/generations", json=BODY)  # noqa: E731
        running = asyncio.create_task(post())
        await wait_until(pipeline.entered.is_set)
        queued = asyncio.create_task(post())
        await wait_until(lambda: worker.waiting == 1)
        refused = await post()
        gate.set()
        return refused, await running, await queued

    refused, running, queued = _run_concurrently(app, scenario)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "queue_full"
    assert refused.headers["retry-after"] == "1"
    assert running.status_code == 200 and queued.status_code == 200
    assert pipeline.calls == 2


def test_timeout_is_504_and_a_waiting_job_is_not_run():
    gate = threading.Event()
    pipeline = FakePipeline(gate, abortable=False)  # holds the worker past both deadlines
    app = create_app(pipeline, settings=ServerSettings(max_queue=4, timeout=0.3))

    async def scenario(client):
        post = lambda: client.post("/v1/images/generations", json=BODY)  # noqa: E731
        first = asyncio.create_task(post())
        await wait_until(pipeline.entered.is_set)
        second = await post()  # waits behind the blocked first one, and times out
        result = await first
        gate.set()
        await wait_until(lambda: app.state.worker.idle)
        follow = await post()
        return result, second, follow

    first, second, follow = _run_concurrently(app, scenario)
    assert first.status_code == 504 and second.status_code == 504
    assert first.json()["error"]["type"] == "timeout_error"
    assert follow.status_code == 200
    assert (
        pipeline.calls == 2
    )  # the first and the follow-up: the second, still queued at its deadline, never ran


def test_a_running_job_past_its_deadline_is_aborted_at_the_next_step():
    gate = threading.Event()
    pipeline = FakePipeline(gate)
    app = create_app(pipeline, settings=ServerSettings(timeout=0.3))

    async def scenario(client):
        post = lambda: client.post("/v1/images/generations", json=BODY)  # noqa: E731
        first = await post()
        # The gate is still closed: only the abort can have freed the worker.
        await wait_until(lambda: app.state.worker.idle)
        gate.set()
        return first, await post()

    first, follow = _run_concurrently(app, scenario)
    assert first.status_code == 504
    assert follow.status_code == 200
    assert pipeline.calls == 2 and pipeline.finished == 1


def test_out_of_memory_is_503_then_the_next_request_succeeds(fake_pipeline, oom_error):
    pipeline = FailingOnce(fake_pipeline, oom_error)
    with TestClient(create_app(pipeline)) as client:
        r = client.post("/v1/images/generations", json=BODY)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "out_of_memory"
        r = client.post("/v1/images/generations", json=BODY)
        assert r.status_code == 200
        assert client.get("/health").status_code == 200


def test_pipeline_error_is_a_generic_500_with_the_request_id_and_serving_goes_on(fake_pipeline, caplog):
    pipeline = FailingOnce(fake_pipeline, RuntimeError("shape mismatch in /secret/models/block3.py"))
    with TestClient(create_app(pipeline)) as client:
        r = client.post("/v1/images/generations", json=BODY)
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "generation_failed"
        # The pipeline's text (paths, internals) stays in the log; the request id links the answer to it.
        assert "secret" not in r.text and "shape mismatch" not in r.text
        rid = r.headers["x-request-id"]
        assert rid in error["message"]
        logged = [rec for rec in caplog.records if rid in rec.getMessage()]
        assert logged and "shape mismatch in /secret/models/block3.py" in str(logged[0].exc_info[1])
        assert client.post("/v1/images/generations", json=BODY).status_code == 200


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt(), GeneratorExit()], ids=type)
def test_a_base_exception_is_logged_answered_500_and_the_worker_lives_on(fake_pipeline, caplog, error):
    pipeline = FailingOnce(fake_pipeline, error)
    # A short timeout: without the fix the request would wait for all of it before its 504.
    with TestClient(create_app(pipeline, settings=ServerSettings(timeout=5))) as client:
        start = time.monotonic()
        r = client.post("/v1/images/generations", json=BODY)
        assert r.status_code == 500, r.text
        assert time.monotonic() - start < 2
        assert r.json()["error"]["code"] == "generation_failed"
        assert any(rec.exc_info and rec.exc_info[1] is error for rec in caplog.records)
        assert client.get("/health").status_code == 200
        assert client.post("/v1/images/generations", json=BODY).status_code == 200


def test_host_memory_error_is_503_out_of_memory(fake_pipeline):
    pipeline = FailingOnce(fake_pipeline, MemoryError())
    with TestClient(create_app(pipeline)) as client:
        r = client.post("/v1/images/generations", json=BODY)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "out_of_memory"
        assert client.post("/v1/images/generations", json=BODY).status_code == 200


def test_a_timed_out_waiting_job_frees_its_queue_slot_at_once():
    gate = threading.Event()
    pipeline = FakePipeline(gate, abortable=False)  # holds the worker past the deadlines
    app = create_app(pipeline, settings=ServerSettings(max_queue=1, timeout=0.3))
    worker = app.state.worker

    async def scenario(client):
        post = lambda: client.post("/v1/images/generations", json=BODY)  # noqa: E731
        running = asyncio.create_task(post())
        await wait_until(pipeline.entered.is_set)
        timed_out = await post()  # queued behind the blocked job until its deadline
        depth = worker.waiting
        fresh = asyncio.create_task(post())  # nobody waits any more: the slot is free for it
        await wait_until(lambda: worker.waiting == 1 or fresh.done())
        gate.set()
        return timed_out, depth, await fresh, await running

    timed_out, depth, fresh, running = _run_concurrently(app, scenario)
    assert timed_out.status_code == 504
    assert depth == 0
    assert fresh.status_code == 200, fresh.text
    assert running.status_code == 504


def test_metrics(fake_pipeline):
    with TestClient(create_app(fake_pipeline, FakeHandle())) as client:
        assert client.post("/v1/images/generations", json={**BODY, "n": 2}).status_code == 200
        assert client.post("/v1/images/generations", json={"prompt": ""}).status_code == 400
        r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'vramferry_requests_total{status="200"} 1.0' in text
    assert 'vramferry_requests_total{status="400"} 1.0' in text
    assert "vramferry_request_latency_seconds_count 2.0" in text
    assert "vramferry_generation_seconds_count 1.0" in text
    assert "vramferry_images_generated_total 2.0" in text
    assert "vramferry_queue_depth 0.0" in text
    assert 'vramferry_peak_memory_bytes{kind="allocated"}' in text
    assert "vramferry_weight_bytes_moved_total 1000.0" in text
    assert "vramferry_h2d_gbps 42.0" in text


def test_worker_stop_cancels_waiting_jobs():
    gate = threading.Event()
    pipeline = FakePipeline(gate)
    app = create_app(pipeline, settings=ServerSettings(max_queue=2))
    worker = app.state.worker
    worker.start()
    from vramferry.server.generation import GenerationParams

    first = worker.submit(GenerationParams(prompt="a", steps=1))
    assert pipeline.entered.wait(5)
    second = worker.submit(GenerationParams(prompt="b", steps=1))
    threading.Timer(0.1, gate.set).start()
    worker.stop()
    assert second.future.cancelled()
    assert first.future.done()
    assert not worker.alive


@pytest.mark.parametrize("steps", [1, 3])
def test_steps_reach_the_pipeline(steps):
    seen = []

    class Recording(FakePipeline):
        def __call__(self, **kwargs):
            seen.append(kwargs)
            return super().__call__(**kwargs)

    pipeline = Recording()
    pipeline.__signature__ = __import__("inspect").signature(FakePipeline())
    with TestClient(create_app(pipeline)) as client:
        r = client.post(
            "/v1/images/generations",
            json={"prompt": "p", "negative_prompt": "n", "num_inference_steps": steps, "guidance_scale": 2.5},
        )
    assert r.status_code == 200
    kwargs = seen[0]
    assert kwargs["num_inference_steps"] == steps
    assert kwargs["negative_prompt"] == "n"
    assert kwargs["guidance_scale"] == 2.5
    assert len(kwargs["generator"]) == 1


class _ReplanningHandle(FakeHandle):
    """An auto-mode handle that records the request shapes it is re-planned for."""

    def __init__(self, refuse_above: int = 10**9) -> None:
        super().__init__()
        import vramferry

        self.config = vramferry.OffloadConfig(mode="auto", onload_device="cpu")
        self.shapes = []
        self.refuse_above = refuse_above

    def replan(self, workload):
        import vramferry

        if workload.height > self.refuse_above:
            raise vramferry.BudgetError(f"{workload.height}px does not fit")
        self.shapes.append((workload.height, workload.width, workload.steps))
        return True


def test_auto_mode_replans_when_the_request_shape_changes(fake_pipeline):
    handle = _ReplanningHandle(refuse_above=128)
    with TestClient(create_app(fake_pipeline, handle)) as client:
        for size in ("64x64", "64x64", "128x64"):
            assert client.post("/v1/images/generations", json={**BODY, "size": size}).status_code == 200
        r = client.post("/v1/images/generations", json={**BODY, "size": "256x256"})
        assert r.status_code == 503 and "does not fit the VRAM budget" in r.json()["error"]["message"]
        assert client.post("/v1/images/generations", json=BODY).status_code == 200
    # Once per new shape; the refused one is not remembered, so the next 64x64 re-plans again.
    assert handle.shapes == [(64, 64, 2), (64, 128, 2), (64, 64, 2)]


def test_auto_mode_replans_once_block_times_are_measured(fake_pipeline):
    handle = _ReplanningHandle()
    handle.has_new_measurements = False
    with TestClient(create_app(fake_pipeline, handle)) as client:
        for measured in (False, False, True, False):
            handle.has_new_measurements = measured
            assert client.post("/v1/images/generations", json=BODY).status_code == 200
    # The first request plans its shape; the same shape plans again only when measurements came in.
    assert handle.shapes == [(64, 64, 2), (64, 64, 2)]
