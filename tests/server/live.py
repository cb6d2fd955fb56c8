"""The app behind a real uvicorn on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager

import uvicorn

from vramferry.server import ServerSettings, uvicorn_options


@contextmanager
def live_server(app, settings: ServerSettings):
    """Serve ``app`` with the CLI's uvicorn options on a free loopback port; yields ``(host, port)``."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **uvicorn_options(settings))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(10)


async def wait_until(condition, timeout: float = 10.0) -> None:
    """Poll ``condition`` from the event loop until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)
