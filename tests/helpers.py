"""Small helpers shared by the integration tests."""

from typing import Any

import msgspec
from aiohttp.test_utils import TestClient
from nats.aio.client import Client

from kloudmeter_py.core.keys import event_subject

Http = TestClient[Any, Any]


async def create_meter(http: Http, **body: Any) -> dict[str, Any]:
    resp = await http.post("/api/create-meter", json=body)
    assert resp.status == 201, await resp.text()
    out: dict[str, Any] = await resp.json()
    return out


async def post_event(http: Http, **body: Any) -> None:
    resp = await http.post("/api/register-event", json=body)
    assert resp.status == 202, await resp.text()


async def publish_event(nc: Client, stream: str = "meters", **body: Any) -> None:
    """Publish straight to the stream subject, as a NATS producer would."""
    subject = event_subject(stream, body["eventType"], body["subject"])
    await nc.jetstream().publish(
        subject, msgspec.json.encode(body), headers={"Nats-Msg-Id": body["id"]}
    )


async def readings(http: Http, **params: str) -> list[dict[str, Any]]:
    resp = await http.get("/api/readings", params=params)
    assert resp.status == 200, await resp.text()
    out: list[dict[str, Any]] = await resp.json()
    return out


def total_count(rs: list[dict[str, Any]]) -> int:
    return sum(r["count"] for r in rs)
