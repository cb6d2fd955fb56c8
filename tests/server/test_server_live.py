"""The app behind a real uvicorn on loopback: clients that leave, slow request heads."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
from live import live_server
from server_fakes import FakePipeline

from vramferry.server import ServerSettings, create_app

BODY = {"prompt": "x", "size": "64x64", "num_inference_steps": 2}


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def _requests_by_status(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    prefix = 'vramferry_requests_total{status="'
    return {
        line[len(prefix) : line.index('"', len(prefix))]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def test_clients_that_leave_cancel_their_jobs_and_are_counted_499():
    gate = threading.Event()
    pipeline = FakePipeline(gate)  # blocks until the gate opens, calling the step callback meanwhile
    settings = ServerSettings(max_queue=2, timeout=60)
    app = create_app(pipeline, settings=settings)
    worker = app.state.worker

    async def drop_two(base: str) -> None:
        async def drop_after(seconds: float):
            async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(5, read=seconds)) as client:
                with pytest.raises(httpx.ReadTimeout):
                    await client.post("/v1/images/generations", json=BODY)

        running = asyncio.create_task(drop_after(0.8))
        await asyncio.to_thread(pipeline.entered.wait, 5)
        await drop_after(0.2)  # waits behind the running one, and leaves first
        # The server sees the disconnect a moment after the client leaves; well before the running one leaves.
        await asyncio.to_thread(_wait_for, lambda: worker.waiting == 0, 0.4)
        assert not running.done()
        await running

    with live_server(app, settings) as (host, port):
        base = f"http://{host}:{port}"
        asyncio.run(drop_two(base))  # the waiting one leaves the queue with its client
        # The gate is still closed: only the cancellation can have emptied the queue and freed the worker.
        _wait_for(lambda: worker.idle)
        assert pipeline.calls == 1 and pipeline.finished == 0  # the waiting one never ran
        gate.set()
        assert httpx.post(f"{base}/v1/images/generations", json=BODY).status_code == 200
        counts = _requests_by_status(base)
    assert counts == {"499": 2.0, "200": 1.0}


def test_a_slow_request_head_is_cut_off():
    settings = ServerSettings(header_timeout=0.3)
    with live_server(create_app(FakePipeline(), settings=settings), settings) as (host, port):
        with socket.create_connection((host, port), timeout=5) as sock:
            # A whole request is answered, on a connection kept alive ...
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            answer = b""
            while not answer.endswith(b'{"status":"ok"}'):
                answer += sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200")
            # ... but the next head, sent a byte at a time and never finished, is cut off after header_timeout.
            start = time.monotonic()
            for byte in b"GET /health HTTP/1.1\r\nHost: ":
                sock.sendall(bytes([byte]))
                time.sleep(0.01)
            assert sock.recv(4096) == b""  # closed by the server
            assert time.monotonic() - start < 2
