"""Schemathesis on the media routes (edits, video jobs, status), in process, on fake pipelines: no 5xx, every status
and header documented, every answer as its schema says. Fewer examples than the images API's run (a video job
writes a file). Schema-valid requests may still be refused here, so that check is left out: an upload's bytes
must be an image, and ``seconds`` × ``fps`` must give at most ``max_frames``, which JSON Schema cannot say."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extra")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402
from server_fakes import FakeEditPipeline, FakeVideoPipeline  # noqa: E402

from vramferry.server import ServerSettings, create_app  # noqa: E402

SETTINGS = ServerSettings(model_name="fake", max_size=128, timeout=30, max_queue=64, max_frames=33)
video_schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(FakeVideoPipeline(takes_image=True), settings=SETTINGS)
)
edit_schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(FakeEditPipeline(inpaint=True), settings=SETTINGS)
)
FUZZ = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@video_schema.include(path_regex="/v1/(videos|status)").parametrize()
@FUZZ
def test_video_routes_conform_to_their_schema(case):
    case.call_and_validate(excluded_checks=[positive_data_acceptance])


@edit_schema.include(path_regex="/v1/images/edits").parametrize()
@FUZZ
def test_edit_route_conforms_to_its_schema(case):
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
