"""KloudMeter's REST API end to end: gateway -> stream -> worker -> KV -> gateway."""

from typing import Any

from aiohttp.test_utils import TestClient

from kloudmeter_py.worker import Worker
from tests.conftest import eventually


async def _readings(http: TestClient[Any, Any], **params: str) -> list[dict[str, Any]]:
    resp = await http.get("/api/readings", params=params)
    assert resp.status == 200
    body: list[dict[str, Any]] = await resp.json()
    return body


async def test_readme_example_counts_and_sums(http: TestClient[Any, Any], worker: Worker) -> None:
    """Create a meter, register events, read the readings: the KloudMeter README walk."""
    resp = await http.post(
        "/api/create-meter",
        json={
            "id": "api-calls",
            "description": "API calls",
            "eventType": "api-request",
            "aggregation": "SUM",
            "valueProperty": "$.duration_ms",
            "groupBy": {"method": "$.method"},
        },
    )
    assert resp.status == 201, await resp.text()
    for i, (method, ms) in enumerate([("GET", 10), ("GET", "15.5"), ("POST", 7)]):
        resp = await http.post(
            "/api/register-event",
            json={
                "id": f"e{i}",
                "time": "2026-11-22T10:00:00Z",
                "eventType": "api-request",
                "subject": "customer-1",
                "data": {"duration_ms": ms, "method": method},
            },
        )
        assert resp.status == 202
        assert await resp.json() == {"status": "ok"}
    readings = await eventually(
        lambda: _readings(http, meter="api-calls"),
        lambda rs: sum(r["count"] for r in rs) == 3,
    )
    by_method = {r["groupBy"]["method"]: r for r in readings}
    assert by_method["GET"]["value"] == 25.5
    assert by_method["GET"]["count"] == 2
    assert by_method["GET"]["min"] == 10 and by_method["GET"]["max"] == 15.5
    assert by_method["POST"]["value"] == 7
    key = by_method["GET"]["key"]
    assert key == "api-calls.customer-1.GET"
    resp = await http.get("/api/reading/", params={"key": key})
    assert resp.status == 200
    assert (await resp.json())["value"] == 25.5
    resp = await http.get("/api/meter/", params={"key": "api-calls"})
    assert (await resp.json())["aggregation"] == "sum"
