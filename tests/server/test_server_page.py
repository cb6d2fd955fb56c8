"""The page at ``GET /`` in a real headless Chromium (Debian's, driven by Playwright): it loads, submits a prompt to
the demo, shows the returned image and the status panel; the run writes a screenshot.

The screenshot goes to ``$VRAMFERRY_SCREENSHOTS`` when set, else to pytest's temporary folder (its path is printed).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx
import pytest
from live import live_server
from server_fakes import FakeHandle, FakeVideoPipeline

from vramferry.server import ServerSettings, create_app

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run installs it when it can)"
        )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def _screenshot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("VRAMFERRY_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_page_generates_an_image_from_the_demo(browser, demo_pipeline, tmp_path):
    settings = ServerSettings(model_name="demo", api_key="page-key", min_size=16)
    app = create_app(demo_pipeline, FakeHandle(), settings)  # its stats: 1000 bytes more per request, 42 GB/s
    with live_server(app, settings) as (host, port):
        base = f"http://{host}:{port}"
        page_answer = httpx.get(base + "/")  # the page itself needs no key; the API does
        assert (
            page_answer.status_code == 200
            and "default-src 'self'" in page_answer.headers["content-security-policy"]
        )
        assert httpx.get(base + "/v1/status").status_code == 401
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(base + "/")
        page.wait_for_selector("#model:has-text('status: a valid API key is required')")
        page.fill("#key", "page-key")
        page.dispatch_event("#key", "change")
        page.wait_for_selector("#model:has-text('demo')")
        page.fill("#prompt", "a lighthouse at dawn")
        page.fill("#size", "64x48")
        page.fill("#steps", "1")
        page.fill("#seed", "7")
        page.click("#submit")
        image = page.wait_for_selector("img#result", timeout=60_000)
        size = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        page.wait_for_selector("#state:has-text('done in')")
        page.wait_for_selector("#stats td:has-text('42.0 GB/s')")  # the panel, refreshed after the answer
        panel = dict(
            page.eval_on_selector_all(
                "#stats tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
            )
        )
        shot = _screenshot_dir(tmp_path) / "page.png"
        page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert size == [64, 48]
    assert errors == []
    assert panel["bytes moved"] == "1.00 KB" and panel["offload"] == "layerwise"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000


def test_the_page_makes_a_video(browser, tmp_path):
    steps = threading.Semaphore(0)
    pipeline = FakeVideoPipeline(steps)
    settings = ServerSettings(model_name="video", min_size=16)
    with live_server(create_app(pipeline, settings=settings), settings) as (host, port):
        page = browser.new_page()
        page.goto(f"http://{host}:{port}/")
        page.wait_for_selector("#submit:has-text('Generate video')")
        page.fill("#size", "64x48")
        page.fill("#frames", "9")
        page.fill("#steps", "2")
        page.click("#submit")
        page.wait_for_selector("#state:has-text('in progress')")
        steps.release(2)
        video = page.wait_for_selector("video#result", timeout=30_000)
        page.wait_for_function("() => document.querySelector('video#result').readyState >= 1", timeout=30_000)
        size = video.evaluate("v => [v.videoWidth, v.videoHeight]")
        page.screenshot(path=str(_screenshot_dir(tmp_path) / "page-video.png"))
    assert size == [64, 48]
