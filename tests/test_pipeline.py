"""The pipeline over a real nats-server: every aggregation, group by, both ingest paths,
meters created and deleted while the worker runs."""

from typing import Any

import pytest
from nats.aio.client import Client

from kloudmeter_py.core.keys import encode_token
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, create_meter, post_event, publish_event, readings, total_count

VALUES = [4, "2.5", 10, 4, -1]
EXPECTED = {
    "count": 5,
    "sum": 19.5,
    "avg": 3.9,
    "min": -1,
    "max": 10,
    "unique": 4,
    "latest": -1,
}


@pytest.mark.parametrize("aggregation", sorted(EXPECTED))
async def test_every_aggregation_through_the_pipeline(
    http: Http, nc: Client, worker: Worker, aggregation: str
) -> None:
    """Each aggregation gives the hand-computed value, over HTTP and NATS ingest alike."""
    body: dict[str, Any] = {"id": "m", "eventType": "usage", "aggregation": aggregation.upper()}
    if aggregation != "count":
        body["valueProperty"] = "$.v"
    await create_meter(http, **body)
    for i, v in enumerate(VALUES):
        event = {
            "id": f"e{i}",
            "time": f"2026-11-22T10:00:0{i}Z",
            "eventType": "usage",
            "subject": "cust",
            "data": {"v": v},
        }
        if i % 2:
            await publish_event(nc, **event)
        else:
            await post_event(http, **event)
    rs = await eventually(lambda: readings(http, meter="m"), lambda rs: total_count(rs) == 5)
    assert len(rs) == 1
    assert rs[0]["value"] == pytest.approx(EXPECTED[aggregation])
    assert rs[0]["aggregation"] == aggregation


async def test_group_by_gives_one_reading_per_combination(http: Http, worker: Worker) -> None:
    """Group values with dots, unicode or absent each get their own reading."""
    await create_meter(
        http,
        id="tokens",
        eventType="llm",
        aggregation="sum",
        valueProperty="$.tokens",
        groupBy={"model": "$.model", "region": "$.where.region"},
    )
    events = [
        ("gpt-4.1", "eu", 10),
        ("gpt-4.1", "eu", 5),
        ("gpt-4.1", None, 1),
        ("モデル", "us", 7),
    ]
    for i, (model, region, tokens) in enumerate(events):
        data: dict[str, Any] = {"model": model, "tokens": tokens}
        if region:
            data["where"] = {"region": region}
        await post_event(http, id=f"g{i}", eventType="llm", subject="acme corp", data=data)
    rs = await eventually(lambda: readings(http, meter="tokens"), lambda rs: total_count(rs) == 4)
    got = {(r["groupBy"]["model"], r["groupBy"]["region"]): r["value"] for r in rs}
    assert got == {("gpt-4.1", "eu"): 15, ("gpt-4.1", None): 1, ("モデル", "us"): 7}
    keys = {r["key"] for r in rs}
    assert f"tokens.{encode_token('acme corp')}.{encode_token('gpt-4.1')}.eu" in keys
    assert all(r["subject"] == "acme corp" for r in rs)


async def test_readings_filter_by_meter_and_subject(http: Http, worker: Worker) -> None:
    """GET /api/readings?meter=&subject= returns only matching readings."""
    await create_meter(http, id="a", eventType="t", aggregation="count")
    await create_meter(http, id="b", eventType="t", aggregation="count")
    for i, subject in enumerate(["s1", "s1", "s2"]):
        await post_event(http, id=f"f{i}", eventType="t", subject=subject)
    await eventually(lambda: readings(http), lambda rs: total_count(rs) == 6)
    assert {r["subject"] for r in await readings(http, meter="a")} == {"s1", "s2"}
    s1 = await readings(http, subject="s1")
    assert sorted(r["meterId"] for r in s1) == ["a", "b"] and total_count(s1) == 4
    both = await readings(http, meter="b", subject="s2")
    assert [(r["meterId"], r["subject"], r["count"]) for r in both] == [("b", "s2", 1)]
    assert await readings(http, meter="nope") == []


async def test_meter_created_while_worker_runs_counts_later_events(
    http: Http, worker: Worker
) -> None:
    """The worker sees a new meter without a restart; earlier events are not counted."""
    await post_event(http, id="before", eventType="t", subject="s")
    await create_meter(http, id="late", eventType="t", aggregation="count")
    await post_event(http, id="after", eventType="t", subject="s")
    rs = await eventually(lambda: readings(http, meter="late"), lambda rs: total_count(rs) >= 1)
    assert total_count(rs) == 1


async def test_deleted_meter_loses_its_readings_and_a_new_one_starts_from_zero(
    http: Http, worker: Worker
) -> None:
    """Delete removes the meter and its readings; the same id created again counts afresh."""
    await create_meter(http, id="m", eventType="t", aggregation="count")
    for i in range(3):
        await post_event(http, id=f"d{i}", eventType="t", subject="s")
    await eventually(lambda: readings(http, meter="m"), lambda rs: total_count(rs) == 3)
    resp = await http.delete("/api/meter", params={"key": "m"})
    assert resp.status == 204
    assert (await http.get("/api/meter/", params={"key": "m"})).status == 404
    assert await readings(http, meter="m") == []
    assert (await http.get("/api/reading/", params={"key": "m.s"})).status == 404
    await create_meter(http, id="m", eventType="t", aggregation="count")
    await post_event(http, id="d9", eventType="t", subject="s")
    rs = await eventually(lambda: readings(http, meter="m"), lambda rs: total_count(rs) >= 1)
    assert total_count(rs) == 1


async def test_duplicate_event_id_counts_once(http: Http, nc: Client, worker: Worker) -> None:
    """The same id over HTTP and over NATS is stored once."""
    await create_meter(http, id="m", eventType="t", aggregation="count")
    body = {"id": "same", "eventType": "t", "subject": "s"}
    await post_event(http, **body)
    resp = await http.post("/api/register-event", json=body)
    assert resp.status == 202 and (await resp.json())["duplicate"] is True
    await publish_event(nc, **body)
    await post_event(http, id="other", eventType="t", subject="s")
    rs = await eventually(lambda: readings(http, meter="m"), lambda rs: total_count(rs) >= 2)
    assert total_count(rs) == 2


async def test_meters_list_and_get(http: Http) -> None:
    """GET /api/meters is an array; GET /api/meter/?key= returns one meter."""
    await create_meter(http, id="x", eventType="t", aggregation="Unique", valueProperty="$.u")
    resp = await http.get("/api/meters")
    meters = await resp.json()
    assert [m["id"] for m in meters] == ["x"] and meters[0]["aggregation"] == "unique"
    resp = await http.get("/api/meter", params={"key": "x"})
    assert resp.status == 200 and (await resp.json())["valueProperty"] == "$.u"


async def test_events_are_stored_with_the_partition_first(nc: Client, settings: Any) -> None:
    """`meters.events.<type>.<subject>` is stored as `meters.events.<partition>.<type>.<subject>`:
    each subject always in the same partition, and every event in exactly one partition filter
    (what the README's `nats stream view --subject` examples rely on)."""
    from kloudmeter_py.core.keys import event_subject
    from kloudmeter_py.store.kv import read
    from kloudmeter_py.store.layout import Layout

    layout = Layout(settings)
    js = nc.jetstream()
    subjects = [f"customer {i}" for i in range(12)]
    for subject in subjects * 2:
        await js.publish(event_subject("meters", "api-request", subject), b"{}")
    stored = [m.subject for m in await read(js, "meters", "meters.events.>")]
    assert len(stored) == 24
    partition_of: dict[str, str] = {}
    for name in stored:
        stream, events, partition, event_type, subject = name.split(".")
        assert (stream, events, event_type) == ("meters", "events", "api-request")
        assert int(partition) in range(settings.partitions)
        assert partition_of.setdefault(subject, partition) == partition
    assert set(partition_of) == {encode_token(s) for s in subjects}
    per_partition = [
        len(await read(js, "meters", layout.partition_filter(p)))
        for p in range(settings.partitions)
    ]
    assert sum(per_partition) == 24 and all(per_partition)
    one = layout.stored_subject("api-request", encode_token("customer 3"))
    assert len(await read(js, "meters", one)) == 2


async def test_setup_refuses_a_changed_partition_count_or_an_older_layout(
    nc: Client, settings: Any
) -> None:
    """The partition count and the stored-subject layout are fixed when the stream is made."""
    import msgspec
    from nats.js.api import StreamConfig, SubjectTransform

    from kloudmeter_py.errors import ConfigError
    from kloudmeter_py.store.provision import provision

    changed = msgspec.structs.replace(settings, partitions=settings.partitions + 1)
    with pytest.raises(ConfigError, match="METER_PARTITIONS"):
        await provision(nc.jetstream(), changed)
    js = nc.jetstream()
    old = "old.events.{{wildcard(1)}}.{{wildcard(2)}}.{{partition(2,2)}}"
    await js.add_stream(
        StreamConfig(
            name="old",
            subjects=["old.events.*.*"],
            subject_transform=SubjectTransform(src="old.events.*.*", dest=old),
        )
    )
    with pytest.raises(ConfigError, match="earlier layout"):
        await provision(js, msgspec.structs.replace(settings, stream="old"))


async def test_a_worker_refuses_a_partition_count_other_than_its_streams(
    nc: Client, settings: Any
) -> None:
    """A worker run with another METER_PARTITIONS than the stream was set up with would leave
    partitions unread (or lease ones with no events) without an error: it stops at start,
    naming the setting and the count to use; a stream never set up is named too."""
    import msgspec

    from kloudmeter_py.errors import ConfigError

    for partitions in (settings.partitions - 1, settings.partitions + 2):
        other = msgspec.structs.replace(settings, partitions=partitions)
        worker = Worker(nc, other, partitions=[0])
        with pytest.raises(ConfigError, match=r"METER_PARTITIONS=2 with this stream"):
            await worker.start()
    missing = msgspec.structs.replace(settings, stream="never-set-up")
    with pytest.raises(ConfigError, match=r"METER_NATS_STREAM.*'never-set-up' not found.*setup"):
        await Worker(nc, missing, partitions=[0]).start()
    same = Worker(nc, settings, partitions=[0])
    await same.start()
    await same.stop()
