"""HTTP ingest refuses what is not JSON (415) and control characters in values (400 naming
the field), publishing nothing; served by the real handler on aiohttp's test server with a
recording stand-in for the Kafka producer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from streams.settings import load_settings
from streams.stages.ingest import IngestServer
from tests.unit.test_leads import SOLAR

REPO = Path(__file__).resolve().parents[2]
SETTINGS = load_settings(REPO / "config" / "demo.yaml")
TOKEN = SETTINGS.ingest.producers[0].token.get_secret_value()


class RecordingProducer:
    """Any producer call is recorded (and succeeds)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        async def call(*_: Any, **__: Any) -> None:
            self.calls.append(name)

        return call


async def post(body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any], list[str]]:
    server = IngestServer(SETTINGS)
    producer = RecordingProducer()
    server._producer = producer  # type: ignore[assignment]
    app = web.Application()
    app.router.add_post("/v1/leads", server.handle_lead)
    async with TestClient(TestServer(app)) as client:
        resp = await client.post(
            "/v1/leads",
            data=body,
            headers={"Authorization": f"Bearer {TOKEN}", **headers},
            skip_auto_headers=["Content-Type"],
        )
        return resp.status, await resp.json(), producer.calls


BODY = orjson.dumps(SOLAR)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "application/json; charset=latin-1",
        "application/jsonp",
    ],
)
async def test_a_body_that_is_not_json_is_refused_with_415(content_type: str) -> None:
    status, body, calls = await post(BODY, {"Content-Type": content_type})
    assert status == 415
    assert body["field"] is None
    assert "application/json" in body["error"] or "UTF-8" in body["error"]
    assert calls == []  # nothing published


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/json"},
        {"Content-Type": "application/json; charset=utf-8"},
        {"Content-Type": 'Application/JSON;charset="UTF-8"'},
        {"Content-Type": "application/vnd.leads+json"},
        {},  # no Content-Type: read as JSON
    ],
)
async def test_json_is_accepted(headers: dict[str, str]) -> None:
    status, body, calls = await post(BODY, headers)
    assert status == 202, body
    assert body["lead_id"] and calls


async def test_a_token_is_checked_before_the_content_type() -> None:
    server = IngestServer(SETTINGS)
    app = web.Application()
    app.router.add_post("/v1/leads", server.handle_lead)
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/v1/leads", data=BODY, headers={"Content-Type": "text/plain"})
        assert resp.status == 401


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("first_name", "Ada\u0000"),
        ("address", "1 Main St\u0007"),
        ("zip", "902\u001f10"),
    ],
)
async def test_control_characters_are_refused_naming_the_field(field: str, value: str) -> None:
    status, body, calls = await post(
        orjson.dumps({**SOLAR, field: value}), {"Content-Type": "application/json"}
    )
    assert (status, body["field"]) == (400, field)
    assert "control character" in body["error"]
    assert calls == []
