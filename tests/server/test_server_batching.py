"""Batching: queued image requests that can share a pipeline call run as one call; incompatible ones never do;
a batch's failure, cancellation or deadline touches only its own requests; ``max_batch=1`` is the unbatched path."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from live import wait_until
from PIL import Image
from server_fakes import FakeHandle, FakePipeline, Recording

from vramferry.server import ServerSettings, create_app
from vramferry.server.generation import GenerationParams
from vramferry.server.worker import GenerationOutOfMemory, JobCancelled

URL = "/v1/images/generations"
BODY = {"prompt": "x", "size": "64x64", "num_inference_steps": 2}
DEMO = {"call_defaults": {"max_sequence_length": 64}}  # the demo's tokenizers are short


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def _serve(app, scenario):
    """Run ``scenario(post)`` against ``app`` on one event loop, so requests overlap; ``post(body)`` sends one
    generation request. Every request has a client-side timeout."""

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            try:
                return await asyncio.wait_for(scenario(lambda body: client.post(URL, json=body)), 60)
            finally:
                app.state.worker.stop()

    return asyncio.run(main())


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


def _images(response) -> list[Image.Image]:
    assert response.status_code == 200, response.text
    return [
        Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB")
        for d in response.json()["data"]
    ]


async def _gated_first(post, pipeline, body):
    """Send ``body`` and wait until its call holds the worker (the pipeline's gate is closed)."""
    task = asyncio.create_task(post(body))
    await wait_until(pipeline.entered.is_set)
    return task


# -- sharing calls -----------------------------------------------------------------------------------------------


def test_four_concurrent_requests_to_the_demo_share_one_call(demo_pipeline):
    pipeline = Recording(demo_pipeline)
    settings = ServerSettings(max_batch=4, batch_wait=2.0, **DEMO)  # the cap, reached, ends the wait
    app = create_app(pipeline, settings=settings)

    async def scenario(post):
        return await asyncio.gather(*(post({**BODY, "prompt": f"p{i}", "seed": i}) for i in range(4)))

    answers = _serve(app, scenario)
    text = app.state.metrics.render().decode()
    assert [len(_images(r)) for r in answers] == [1, 1, 1, 1]
    assert pipeline.calls == 1 and pipeline.prompts() == [["p0", "p1", "p2", "p3"]]
    assert _metric(text, "vramferry_batch_size_count") == 1
    assert _metric(text, "vramferry_batch_size_sum") == 4
    assert _metric(text, "vramferry_images_generated_total") == 4
    assert _metric(text, "vramferry_request_waiting_seconds_count") == 4
    assert _metric(text, "vramferry_generation_seconds_count") == 4


def test_max_batch_1_runs_one_unbatched_call_per_request(demo_pipeline):
    pipeline = Recording(demo_pipeline)
    app = create_app(pipeline, settings=ServerSettings(max_batch=1, **DEMO))

    async def scenario(post):
        return await asyncio.gather(*(post({**BODY, "prompt": f"p{i}", "seed": i}) for i in range(4)))

    answers = _serve(app, scenario)
    assert all(len(_images(r)) == 1 for r in answers)
    assert pipeline.calls == 4
    assert sorted(pipeline.prompts()) == ["p0", "p1", "p2", "p3"]  # strings: the call of a request alone
    assert all(kwargs["num_images_per_prompt"] == 1 for kwargs in pipeline.seen)
    text = app.state.metrics.render().decode()
    assert _metric(text, "vramferry_batch_size_count") == 4 and _metric(text, "vramferry_batch_size_sum") == 4


def test_max_batch_1_never_waits_for_company(fake_pipeline):
    app = create_app(fake_pipeline, settings=ServerSettings(max_batch=1, batch_wait=30.0))

    async def scenario(post):
        start = time.monotonic()
        answer = await post(BODY)
        return answer, time.monotonic() - start

    answer, seconds = _serve(app, scenario)
    assert answer.status_code == 200 and seconds < 10


def test_each_image_keeps_the_seed_it_has_alone():
    # The fake colours each image by its generator's seed: the batch must hand out seed + i per request, in order.
    pipeline = Recording(FakePipeline(gate := threading.Event()))
    app = create_app(pipeline, settings=ServerSettings(max_batch=8, batch_wait=0.05))

    async def scenario(post):
        first = await _gated_first(post, pipeline.inner, {**BODY, "prompt": "first"})
        queued = [
            asyncio.create_task(post({**BODY, "prompt": p, "seed": seed, "n": n}))
            for p, seed, n in (("a", 10, 1), ("b", 20, 2), ("c", 30, 1))
        ]
        await wait_until(lambda: app.state.worker.waiting == 3)
        gate.set()
        return [await task for task in (first, *queued)]

    first, *answers = _serve(app, scenario)
    assert pipeline.prompts() == ["first", ["a", "b", "b", "c"]]
    batched = [_images(r) for r in answers]
    alone = [[FakePipeline()(prompt="", generator=[torch.Generator().manual_seed(s)]).images[0] for s in seeds]
             for seeds in ((10,), (20, 21), (30,))]  # fmt: skip
    assert [[i.getpixel((0, 0)) for i in imgs] for imgs in batched] == [
        [i.getpixel((0, 0)) for i in imgs] for imgs in alone
    ]


def test_batched_demo_images_match_each_seed_alone_within_rounding(demo_pipeline):
    settings = ServerSettings(max_batch=4, batch_wait=2.0, **DEMO)
    bodies = [
        {**BODY, "size": "128x128", "prompt": p, "seed": s} for p, s in (("cat", 1), ("dog", 2), ("sea", 3))
    ]

    async def batched(post):
        return await asyncio.gather(*(post(body) for body in bodies))

    async def alone(post):
        return [await post({**body, "batch": False}) for body in bodies + bodies[:1]]

    app = create_app(Recording(demo_pipeline), settings=ServerSettings(max_batch=3, batch_wait=2.0, **DEMO))
    together = [_images(r)[0] for r in _serve(app, batched)]
    assert app.state.worker.pipeline.calls == 1
    single_app = create_app(Recording(demo_pipeline), settings=settings)
    singles = [_images(r)[0] for r in _serve(single_app, alone)]
    assert single_app.state.worker.pipeline.calls == 4
    # "batch": false repeats bit for bit.
    assert np.array_equal(np.asarray(singles[0]), np.asarray(singles[3]))
    for a, b in zip(together, singles, strict=False):
        diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        # The same noise; only the batched matmuls' rounding differs (float32 on the CPU: a level at most).
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert np.abs(np.asarray(singles[0], dtype=int) - np.asarray(singles[1], dtype=int)).mean() > 5


def test_incompatible_requests_never_share_a_call():
    pipeline = Recording(FakePipeline(gate := threading.Event()))
    app = create_app(pipeline, settings=ServerSettings(max_batch=8, batch_wait=0.05))
    others = [
        ("a", {}),
        ("size", {"size": "128x64"}),
        ("steps", {"num_inference_steps": 3}),
        ("guidance", {"guidance_scale": 5.0}),
        ("negative", {"negative_prompt": "blur"}),
        ("alone", {"batch": False}),
        ("b", {"output_format": "jpeg"}),  # encoded per request after the call: may share it
        ("negative2", {"negative_prompt": "dark"}),
    ]

    async def scenario(post):
        first = await _gated_first(post, pipeline.inner, {**BODY, "prompt": "first"})
        queued = [asyncio.create_task(post({**BODY, "prompt": name, **extra})) for name, extra in others]
        await wait_until(lambda: app.state.worker.waiting == len(others))
        gate.set()
        return [await task for task in (first, *queued)]

    answers = _serve(app, scenario)
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert pipeline.prompts() == [
        "first",
        ["a", "b"],
        "size",
        "steps",
        "guidance",
        ["negative", "negative2"],
        "alone",
    ]
    assert pipeline.seen[5]["negative_prompt"] == ["blur", "dark"]
    assert answers[7].json()["output_format"] == "jpeg"


def test_a_video_pipeline_runs_image_requests_alone():
    from server_fakes import FakeVideoPipeline

    pipeline = Recording(FakeVideoPipeline())
    app = create_app(pipeline, settings=ServerSettings(max_batch=8, batch_wait=1.0))

    async def scenario(post):
        return await asyncio.gather(*(post({**BODY, "prompt": f"p{i}"}) for i in range(3)))

    assert all(r.status_code == 200 for r in _serve(app, scenario))
    assert sorted(pipeline.prompts()) == ["p0", "p1", "p2"]


def test_a_request_never_waits_longer_than_batch_wait_for_company(fake_pipeline):
    app = create_app(Recording(fake_pipeline), settings=ServerSettings(max_batch=8, batch_wait=0.2))

    async def scenario(post):
        start = time.monotonic()
        answer = await post(BODY)
        return answer, time.monotonic() - start

    answer, seconds = _serve(app, scenario)
    assert answer.status_code == 200
    assert 0.2 <= seconds < 2.0
    text = app.state.metrics.render().decode()
    assert _metric(text, "vramferry_request_waiting_seconds_sum") >= 0.2


# -- the batch size ----------------------------------------------------------------------------------------------


class _PlanningHandle(FakeHandle):
    """A handle on a "GPU" whose planner says batch 3 is the knee (images/s flat after it) and 5 does not fit."""

    def __init__(self) -> None:
        super().__init__()
        self.device = torch.device("cuda")  # only its type is read; no CUDA is touched
        self.planned: list[int] = []

    def prepare(self, workloads):
        from types import SimpleNamespace

        import vramferry

        (work,) = workloads
        self.planned.append(work.batch)
        if work.batch >= 5:
            raise vramferry.BudgetError("activations do not fit")
        request_s = {1: 1.0, 2: 1.0, 3: 1.2, 4: 1.6}[work.batch]
        return [SimpleNamespace(predicted_step_s=request_s / 2, predicted_request_s=request_s,
                                predicted_peak_bytes=10**9)]  # fmt: skip


def test_planned_batch_is_the_knee_that_fits():
    from vramferry.server.batching import planned_batch
    from vramferry.server.generation import request_workload

    work = request_workload(GenerationParams(prompt="x", width=64, height=64, steps=2))
    handle = _PlanningHandle()
    assert planned_batch(handle, work, 8) == 3
    assert handle.planned == [1, 2, 3, 4, 5]  # stops at the first that does not fit
    assert planned_batch(handle, work, 2) == 2
    assert planned_batch(handle, work, 1) == 1
    assert planned_batch(None, work, 6) == 6  # no handle: --max-batch
    handle.device = torch.device("cpu")
    assert planned_batch(handle, work, 6) == 6  # the CPU: the plan's times are a GPU preset's

    def broken(workloads):
        raise RuntimeError("cannot price this shape")

    handle.device, handle.prepare = torch.device("cuda"), broken
    assert planned_batch(handle, work, 6) == 1


def test_the_worker_caps_batches_at_the_planned_size():
    pipeline = Recording(FakePipeline(gate := threading.Event()))
    handle = _PlanningHandle()
    app = create_app(pipeline, handle, settings=ServerSettings(max_batch=8, batch_wait=0.05))

    async def scenario(post):
        first = await _gated_first(post, pipeline.inner, {**BODY, "prompt": "first"})
        queued = [asyncio.create_task(post({**BODY, "prompt": f"p{i}"})) for i in range(5)]
        await wait_until(lambda: app.state.worker.waiting == 5)
        gate.set()
        return [await task for task in (first, *queued)]

    assert all(r.status_code == 200 for r in _serve(app, scenario))
    assert pipeline.prompts() == ["first", ["p0", "p1", "p2"], ["p3", "p4"]]
    assert handle.planned == [1, 2, 3, 4, 5]  # planned once for the shape, then taken from the worker's cache


@pytest.mark.parametrize("mode", ["auto", "layerwise"])
def test_the_plan_follows_the_images_of_the_call(fake_pipeline, mode):
    """In auto mode the images per call change what fits; in every mode the predictions and the block times
    measured during a call belong to its own batch size."""
    import vramferry

    class Replanning(FakeHandle):
        config = vramferry.OffloadConfig(mode=mode, onload_device="cpu")

        def __init__(self):
            super().__init__()
            self.batches = []

        def replan(self, workload):
            self.batches.append(workload.batch)
            return False

    handle = Replanning()
    app = create_app(Recording(fake_pipeline), handle, settings=ServerSettings(max_batch=4, batch_wait=2.0))

    async def scenario(post):
        together = await asyncio.gather(
            *(post({**BODY, "prompt": f"p{i}"}) for i in range(3)), post({**BODY, "n": 1})
        )
        again = await asyncio.gather(*(post({**BODY, "prompt": f"q{i}", "n": 2}) for i in range(2)))
        alone = await post({**BODY, "batch": False})
        return [*together, *again, alone]

    assert all(r.status_code == 200 for r in _serve(app, scenario))
    # 4 images in one call, then the same shape again (the plan fitted to it stays), then 1 image alone.
    assert handle.batches == [4, 1]


# -- failures, cancellation and deadlines ------------------------------------------------------------------------


def test_a_failed_batch_fails_only_its_own_requests_with_their_codes():
    def fail(kwargs):
        prompts = kwargs["prompt"] if isinstance(kwargs["prompt"], list) else [kwargs["prompt"]]
        if "oom" in prompts:
            return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if "bad" in prompts:
            return RuntimeError("shape mismatch in /secret/block.py")
        return None

    pipeline = Recording(FakePipeline(gate := threading.Event()), fail)
    app = create_app(pipeline, settings=ServerSettings(max_batch=8, batch_wait=0.05))
    bodies = [
        {**BODY, "prompt": "oom"},
        {**BODY, "prompt": "oom-mate"},
        {**BODY, "size": "128x128", "prompt": "fine"},
        {**BODY, "size": "192x192", "prompt": "bad"},
        {**BODY, "size": "192x192", "prompt": "bad-mate"},
    ]

    async def scenario(post):
        first = await _gated_first(post, pipeline.inner, {**BODY, "prompt": "first"})
        queued = [asyncio.create_task(post(body)) for body in bodies]
        await wait_until(lambda: app.state.worker.waiting == len(bodies))
        gate.set()
        answers = [await task for task in (first, *queued)]
        # After the out-of-memory batch of 2, this shape runs one image per call.
        after = await asyncio.gather(*(post({**BODY, "prompt": f"after{i}"}) for i in range(2)))
        return answers, after

    (first, oom, oom_mate, fine, bad, bad_mate), after = _serve(app, scenario)
    assert first.status_code == 200 and fine.status_code == 200
    for r in (oom, oom_mate):
        assert r.status_code == 503 and r.json()["error"]["code"] == "out_of_memory"
    for r in (bad, bad_mate):
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
        assert "secret" not in r.text
    assert pipeline.prompts()[:4] == ["first", ["oom", "oom-mate"], "fine", ["bad", "bad-mate"]]
    assert all(r.status_code == 200 for r in after)
    assert sorted(pipeline.prompts()[4:]) == ["after0", "after1"]


def _worker(pipeline, **settings):
    app = create_app(pipeline, settings=ServerSettings(**{"max_batch": 8, "batch_wait": 0.2, **settings}))
    worker = app.state.worker
    worker.start()
    return worker


def _params(prompt: str) -> GenerationParams:
    return GenerationParams(prompt=prompt, steps=2, width=64, height=64, seed=1)


def test_cancelling_one_request_of_a_batch_drops_only_its_image():
    pipeline = FakePipeline(gate := threading.Event())  # calls the step callback while it waits
    worker = _worker(pipeline)
    try:
        jobs = [worker.submit(_params(p)) for p in ("a", "b", "c")]
        assert pipeline.entered.wait(10)
        assert worker.running == 3
        worker.cancel(jobs[1], "the client closed the connection")
        time.sleep(0.05)  # steps go on meanwhile: the call is not aborted
        gate.set()
        results = [job.future.exception(10) or job.future.result(10) for job in jobs]
    finally:
        worker.stop()
    assert isinstance(results[1], JobCancelled)
    assert len(results[0]) == 1 and len(results[2]) == 1 and results[0][0].startswith(b"\x89PNG")
    assert pipeline.calls == 1 and pipeline.finished == 1


def test_a_batch_is_aborted_only_once_all_its_requests_are_gone():
    pipeline = FakePipeline(threading.Event())  # never opens: only an abort ends the call
    worker = _worker(pipeline)
    try:
        soon = time.monotonic() + 0.3
        jobs = [worker.submit(_params("a"), deadline=soon), worker.submit(_params("b"))]
        assert pipeline.entered.wait(10)
        _wait(lambda: jobs[0].cancelled.is_set())  # its deadline passed mid-call: marked, the call goes on
        time.sleep(0.05)
        assert worker.running == 2 and not jobs[1].future.done()
        worker.cancel(jobs[1], "the client closed the connection")
        _wait(lambda: worker.idle)
    finally:
        worker.stop()
    assert all(isinstance(job.future.exception(5), JobCancelled) for job in jobs)
    assert pipeline.calls == 1 and pipeline.finished == 0


def test_a_job_cancelled_while_it_waits_for_company_is_not_run():
    pipeline = Recording(FakePipeline())
    worker = _worker(pipeline, batch_wait=5.0)
    try:
        first = worker.submit(_params("a"))
        _wait(lambda: worker.running == 1)  # out of the queue, waiting for company
        second = worker.submit(_params("b"))
        worker.cancel(second, "the client closed the connection")
        third = worker.submit(_params("c"))
        for _ in range(6):  # the cap (8 images): the wait ends
            worker.submit(_params("d"))
        assert len(first.future.result(10)) == 1 and len(third.future.result(10)) == 1
    finally:
        worker.stop()
    assert second.future.cancelled()
    assert pipeline.prompts() == [["a", "c", *["d"] * 6]]


def test_stopping_gives_up_the_jobs_waiting_for_company():
    worker = _worker(FakePipeline(), batch_wait=30.0)
    job = worker.submit(_params("a"))
    _wait(lambda: worker.running == 1)
    start = time.monotonic()
    worker.stop()
    assert time.monotonic() - start < 2 and job.future.cancelled()


def test_an_out_of_memory_batch_answers_each_of_its_jobs(oom_error):
    pipeline = Recording(
        FakePipeline(), lambda kwargs: oom_error if isinstance(kwargs["prompt"], list) else None
    )
    worker = _worker(pipeline, batch_wait=2.0, max_batch=2)
    try:
        jobs = [worker.submit(_params(p)) for p in ("a", "b")]
        errors = [job.future.exception(10) for job in jobs]
    finally:
        worker.stop()
    assert all(isinstance(e, GenerationOutOfMemory) for e in errors)


# -- settings ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [{"max_batch": 0}, {"batch_wait": -1.0}, {"batch_wait": float("nan")}])
def test_bad_batch_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ServerSettings(**bad)


def test_the_batch_flags_reach_the_settings():
    from vramferry.cli import build_parser
    from vramferry.cli_options import server_settings

    parse = build_parser().parse_args
    settings = server_settings(parse(["serve", "--max-batch", "3", "--batch-wait", "0.1"]), {})
    assert (settings.max_batch, settings.batch_wait) == (3, 0.1)
    defaults = server_settings(parse(["serve"]), {})
    assert (defaults.max_batch, defaults.batch_wait) == (ServerSettings.max_batch, ServerSettings.batch_wait)
    with pytest.raises(SystemExit):
        parse(["serve", "--max-batch", "0"])


def test_batch_must_be_a_boolean(fake_pipeline):
    from fastapi.testclient import TestClient

    with TestClient(create_app(fake_pipeline)) as client:
        r = client.post(URL, json={**BODY, "batch": "no"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "batch"
