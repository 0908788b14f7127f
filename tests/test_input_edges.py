"""Inputs at the edges of what the types allow: answered 400 (or dead-lettered), never a 500,
a stuck partition or a blocked event loop. Found by the schemathesis run and probing after it."""

import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.core.keys import event_subject
from kloudmeter_py.core.models import Meter
from kloudmeter_py.core.query import build_query, plan
from kloudmeter_py.store.query import horizons
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, create_meter, post_event, readings

# Valid RFC 3339, but the UTC instant (or its day window) is outside Python's datetime range.
EDGE_TIMES = ["9999-12-31T23:59:59-14:00", "9999-12-31T12:00:00Z", "0001-01-01T00:00:00Z"]


@pytest.mark.parametrize("at", EDGE_TIMES)
async def test_event_time_out_of_range_is_400(http: Http, at: str) -> None:
    event = {"id": "e", "eventType": "t", "subject": "s", "time": at}
    resp = await http.post("/api/register-event", json=event)
    assert resp.status == 400, await resp.text()
    cloud = {
        "id": "e",
        "source": "a",
        "specversion": "1.0",
        "type": "t",
        "subject": "s",
        "time": at,
    }
    resp = await http.post("/api/v1/events", json=cloud)
    assert resp.status == 400, await resp.text()


async def test_event_time_out_of_range_does_not_stop_the_partition(
    http: Http, nc: Client, worker: Worker
) -> None:
    await create_meter(http, id="m", eventType="t", aggregation="count")
    for i, at in enumerate(EDGE_TIMES):  # straight to NATS: the gateway cannot refuse them
        body = {"id": f"edge-{i}", "eventType": "t", "subject": "s", "time": at}
        await nc.jetstream().publish(event_subject("meters", "t", "s"), msgspec.json.encode(body))
    await post_event(http, id="after", eventType="t", subject="s")
    rs = await eventually(lambda: readings(http, meter="m"), lambda r: len(r) == 1)
    assert rs[0]["count"] == 1  # the events behind them in the partition are applied

    async def dead_letters() -> Any:
        return await (await http.get("/api/dead-letters")).json()

    counts = await eventually(dead_letters, lambda c: c["total"] == len(EDGE_TIMES))
    assert counts["byMeter"] == {"_event": len(EDGE_TIMES)}


@pytest.mark.parametrize(
    "path",
    [
        "/api/meters/m/query?from=0001-01-01T00:00:00%2B01:00",
        "/api/meters/m/query?to=9999-12-31T23:59:00-14:00",
        "/api/v1/meters/m/query?from=0001-01-01T00:00:00%2B01:00",
        "/api/usage?tenant=a&start=0001-01-01T00:00:00%2B01:00",
        "/api/usage?tenant=a&start=2020-01-01T00:00:00Z&end=9999-12-31T23:59:59-14:00",
    ],
)
async def test_query_time_out_of_range_is_400(http: Http, path: str) -> None:
    await create_meter(http, id="m", eventType="t", aggregation="count")
    resp = await http.get(path)
    assert resp.status == 400, await resp.text()


@pytest.mark.parametrize(
    "body",
    [{"from": 5}, {"subject": "acme"}, {"groupBy": "method"}, {"filterGroupBy": [1]}],
)
async def test_openmeter_query_body_types_are_checked(http: Http, body: dict[str, Any]) -> None:
    await create_meter(http, id="m", eventType="t", aggregation="count", groupBy={"method": "$.m"})
    resp = await http.post("/api/v1/meters/m/query", json=body)
    assert resp.status == 400, await resp.text()
    assert resp.content_type == "application/problem+json"


async def test_too_many_windows_is_400(http: Http) -> None:
    await create_meter(http, id="m", eventType="t", aggregation="count")
    resp = await http.get("/api/meters/m/query?windowSize=MINUTE&from=2000-01-01T00:00:00Z")
    assert resp.status == 400, await resp.text()
    # The default range of minute windows is small enough.
    resp = await http.get("/api/meters/m/query?windowSize=MINUTE")
    assert resp.status == 200, await resp.text()


def test_planning_a_long_expired_range_is_cheap() -> None:
    """A total from 2000 crossed the expired years minute by minute (10 s on the event loop)."""
    meter = Meter(id="m", eventType="t", aggregation="count", createdAt=datetime.now(UTC))
    q = build_query(
        meter,
        start="2000-01-01T00:00:00Z",
        end=None,
        window_size=None,
        tz="UTC",
        subjects=[],
        group_by=[],
        filter_group_by={},
        interval=60,
        now=datetime.now(UTC),
        day_retention_days=400,
    )
    started = time.perf_counter()
    plan(q, 60, horizons(Settings()))
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    "path", ["/v1/prices/%C3%BD", "/template/%C3%BD", "/api/perf/host-1/a%0Ab"]
)
async def test_odd_ids_and_labels_are_404(http: Http, path: str) -> None:
    resp = await http.get(path)
    assert resp.status == 404, await resp.text()
