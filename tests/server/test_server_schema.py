"""Schemathesis against the app in process: requests generated from /openapi.json, valid and invalid; every answer
must match the schema (no 5xx, documented statuses and headers, valid requests accepted, invalid ones rejected)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extra")
from hypothesis import HealthCheck, settings  # noqa: E402
from server_fakes import FakePipeline  # noqa: E402

from vramferry.server import ServerSettings, create_app  # noqa: E402

# Small images, so that a valid request for 10 images of 200 steps still answers in milliseconds.
APP = create_app(
    FakePipeline(), settings=ServerSettings(model_name="fake", max_size=256, timeout=30, max_queue=64)
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_schema(case):
    case.call_and_validate()
