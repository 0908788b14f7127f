"""The official openmeter SDK, unchanged, as the client of our v1 API."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from corehttp.exceptions import HttpResponseError, ResourceNotFoundError
from openmeter.aio import Client as OpenMeter

from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, readings, total_count


def _event(i: int, subject: str, model: str, tokens: int, t: datetime) -> dict[str, Any]:
    return {
        "id": f"om-{i}",
        "source": "tests",
        "specversion": "1.0",
        "type": "prompt",
        "subject": subject,
        "time": t.isoformat().replace("+00:00", "Z"),
        "data": {"tokens": tokens, "model": model},
    }


async def test_openmeter_sdk_ingests_lists_and_queries(http: Http, worker: Worker) -> None:
    """Ingest one and a batch, list and get meters, query with window, subject and group
    filters, list subjects, delete: all through the openmeter SDK."""
    base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    endpoint = str(http.make_url("")).rstrip("/")
    async with OpenMeter(endpoint=endpoint, retry_total=0) as om:
        created = await om.meters.create(
            {
                "slug": "tokens",
                "aggregation": "SUM",
                "eventType": "prompt",
                "valueProperty": "$.tokens",
                "groupBy": {"model": "$.model"},
            }
        )
        assert created.slug == "tokens" and created.aggregation == "SUM"
        await om.events.ingest_event(_event(0, "acme", "gpt", 10, base))
        await om.events.ingest_events(
            [
                _event(1, "acme", "gpt", 5, base + timedelta(minutes=1)),
                _event(2, "acme", "llama", 7, base + timedelta(minutes=2)),
                _event(3, "globex", "gpt", 100, base + timedelta(minutes=61)),
            ]
        )
        await om.events.ingest_event(_event(0, "acme", "gpt", 10, base))  # duplicate id
        await eventually(lambda: readings(http, meter="tokens"), lambda rs: total_count(rs) == 4)

        meters = await om.meters.list()
        assert [m.slug for m in meters] == ["tokens"]
        assert (await om.meters.get("tokens")).value_property == "$.tokens"

        hourly = await om.meters.query_json(
            "tokens",
            from_parameter=base,
            to=base + timedelta(hours=2),
            window_size="HOUR",
            window_time_zone="UTC",
        )
        assert [(r.window_start, r.value) for r in hourly.data] == [
            (base, 22.0),
            (base + timedelta(hours=1), 100.0),
        ]
        by_subject = await om.meters.query_json(
            "tokens",
            from_parameter=base,
            to=base + timedelta(hours=2),
            subject=["acme"],
            group_by=["model"],
        )
        assert sorted((r.subject, r.group_by["model"], r.value) for r in by_subject.data) == [
            ("acme", "gpt", 15.0),
            ("acme", "llama", 7.0),
        ]
        filtered = await om.meters.query_json(
            "tokens",
            from_parameter=base,
            to=base + timedelta(hours=2),
            filter_group_by={"model": "gpt"},
            group_by=["subject"],
        )
        assert sorted((r.subject, r.value) for r in filtered.data) == [
            ("acme", 15.0),
            ("globex", 100.0),
        ]
        posted = await om.meters.query(
            "tokens",
            {
                "from": base.isoformat(),
                "to": (base + timedelta(hours=2)).isoformat(),
                "windowSize": "DAY",
                "filterGroupBy": {"model": ["llama"]},
            },
        )
        assert [r.value for r in posted.data] == [7.0]
        assert sorted(await om.meters.list_subjects("tokens")) == ["acme", "globex"]

        with pytest.raises(HttpResponseError) as err:
            await om.events.ingest_event({"id": "x", "source": "s", "specversion": "1.0"})
        assert err.value.status_code == 400
        await om.meters.delete("tokens")
        with pytest.raises(ResourceNotFoundError):
            await om.meters.get("tokens")


async def test_one_set_of_meters_for_both_apis(http: Http) -> None:
    """A meter created through KloudMeter's API shows in OpenMeter's, and back."""
    resp = await http.post(
        "/api/create-meter",
        json={"id": "users", "eventType": "login", "aggregation": "unique", "valueProperty": "$.u"},
    )
    assert resp.status == 201
    resp = await http.get("/api/v1/meters/users")
    body = await resp.json()
    assert (body["slug"], body["aggregation"]) == ("users", "UNIQUE_COUNT")
    resp = await http.post(
        "/api/v1/meters",
        json={"slug": "calls", "eventType": "req", "aggregation": "COUNT"},
    )
    assert resp.status == 201
    resp = await http.get("/api/meter/", params={"key": "calls"})
    assert (await resp.json())["aggregation"] == "count"
    resp = await http.post("/api/v1/meters", json={"slug": "calls", "eventType": "req"})
    assert resp.status == 400
    assert resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert problem["status"] == 400 and "aggregation" in problem["detail"]


async def test_cloudevents_are_validated_per_the_spec(http: Http) -> None:
    """Missing id/source/specversion/type/subject, a bad time or non-object data: 400 naming
    the field; a wrong content type: 400 too."""
    good = _event(1, "s", "m", 1, datetime.now(UTC))
    for field in ("id", "source", "specversion", "type", "subject"):
        bad = {k: v for k, v in good.items() if k != field}
        resp = await http.post(
            "/api/v1/events", json=bad, headers={"Content-Type": "application/cloudevents+json"}
        )
        assert resp.status == 400, field
        assert (await resp.json())["field"] == field
    for field, value in (("time", "2026-11-22 10:00"), ("data", [1]), ("specversion", "0.3")):
        resp = await http.post(
            "/api/v1/events",
            json={**good, field: value},
            headers={"Content-Type": "application/cloudevents+json"},
        )
        assert resp.status == 400 and (await resp.json())["field"] == field
    resp = await http.post("/api/v1/events", data=b"{}", headers={"Content-Type": "text/plain"})
    assert resp.status == 400
    resp = await http.post(
        "/api/v1/events", json=[good], headers={"Content-Type": "application/json"}
    )
    assert resp.status == 204


async def test_cloudevents_published_straight_to_nats_count_too(
    http: Http, worker: Worker, nc: Any
) -> None:
    """A CloudEvent JSON on the stream subject works like a KloudMeter event."""
    import msgspec

    await http.post(
        "/api/v1/meters", json={"slug": "p", "eventType": "prompt", "aggregation": "COUNT"}
    )
    event = _event(9, "acme", "gpt", 1, datetime.now(UTC))
    await nc.jetstream().publish(
        "meters.events.prompt.acme", msgspec.json.encode(event), headers={"Nats-Msg-Id": "t#9"}
    )
    rs = await eventually(lambda: readings(http, meter="p"), lambda rs: total_count(rs) == 1)
    assert rs[0]["subject"] == "acme"
