"""Lifecycle state folded by the worker (``resources`` bucket): the pure fold from tables, and
over a real nats-server the routes that read it after the stream lost the events, a replay
that changes nothing, history reads for late meters, a rebuild and two workers."""

import asyncio
import random
from datetime import UTC, datetime
from decimal import Decimal
from itertools import permutations
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from kloudmeter_py.config import Settings
from kloudmeter_py.core.lifecycle import (
    Change,
    DurationMeter,
    LifecyclePoint,
    ResourceState,
    fold,
    meter_key,
    resource_view,
    usage_change,
    usage_events,
)
from kloudmeter_py.core.models import Event, Meter
from kloudmeter_py.core.paths import compile_path
from kloudmeter_py.core.usage import usage_hours
from kloudmeter_py.store import backfill
from kloudmeter_py.store.kv import scan
from kloudmeter_py.store.layout import Layout
from kloudmeter_py.worker import Worker
from kloudmeter_py.worker.lifecycle import consumer_name
from tests.helpers import Http, create_meter, lifecycle_folded, post_event

# ---- the pure fold ----


def _t(hhmm: str) -> datetime:
    return datetime.fromisoformat(f"2026-11-20T{hhmm}:00+00:00")


def _meter(**kw: Any) -> Meter:
    base: dict[str, Any] = {
        "id": "vcpu",
        "eventType": "compute.instance",
        "aggregation": "duration",
        "valueProperty": "$.vcpus",
        "resourceProperty": "$.resource_id",
        "actionProperty": "$.event_type",
        "createdAt": _t("00:00"),
        "startSeq": 0,
    }
    return Meter(**{**base, **kw})


def _event(action: str, at: str, subject: str = "acme", **data: Any) -> Event:
    return Event(
        id=f"{action}-{at}",
        eventType="compute.instance",
        subject=subject,
        time=_t(at),
        data={"event_type": action, "resource_id": "vm-1", **data},
    )


# (action, time, extra data), in event time; the stream sequence is the position here + 1
LIFE = [
    ("create", "10:00", {"vcpus": 2, "region": "bj", "resource_type": "instance"}),
    ("resize", "10:10", {"vcpus": 4}),
    ("power_off", "10:30", {}),
    ("power_on", "10:40", {"region": "sh"}),
    ("delete", "11:00", {}),
]


def _changes(dm: DurationMeter, seqs: list[int]) -> list[Change]:
    out = []
    for seq in seqs:
        action, at, data = LIFE[seq - 1]
        c = dm.change(_event(action, at, **data), seq, _t("23:59"))
        assert c is not None
        out.append(c)
    return out


def _fold_one_by_one(changes: list[Change]) -> ResourceState | None:
    state: ResourceState | None = None
    for c in changes:
        state = fold(state, [c]) or state
    return state


def test_every_order_of_application_folds_to_the_same_state() -> None:
    """Events applied one at a time in any of the 120 orders, or as one batch, give the same
    value, byte for byte: points sorted by event time, each sequence once."""
    dm = DurationMeter(_meter())
    expected = fold(None, _changes(dm, [1, 2, 3, 4, 5]))
    assert expected is not None
    assert [p.seq for p in expected.points] == [1, 2, 3, 4, 5]
    for order in permutations([1, 2, 3, 4, 5]):
        got = _fold_one_by_one(_changes(dm, list(order)))
        assert got is not None
        assert msgspec.json.encode(got) == msgspec.json.encode(expected), order


def test_an_event_already_folded_changes_nothing() -> None:
    """A redelivered or replayed event (its sequence is among the points) gives no write,
    whether alone, in a batch of old ones, or mixed with a new one."""
    dm = DurationMeter(_meter())
    state = fold(None, _changes(dm, [1, 3, 5]))
    assert state is not None
    assert fold(state, _changes(dm, [3])) is None
    assert fold(state, _changes(dm, [5, 1, 3])) is None
    assert fold(state, _changes(dm, [1, 1])) is None
    grown = fold(state, _changes(dm, [3, 2, 2]))
    assert grown is not None
    assert [p.seq for p in grown.points] == [1, 2, 3, 5] and grown.lastSeq == 5


def test_a_late_event_older_than_the_highest_sequence_is_still_applied() -> None:
    """Applied sequences are the points', not a high-water mark: seq 2 after seq 4 counts
    (two workers may fold a resource's events in either order)."""
    dm = DurationMeter(_meter())
    state = fold(None, _changes(dm, [4]))
    assert state is not None and state.lastSeq == 4
    later = fold(state, _changes(dm, [2]))
    assert later is not None
    assert [(p.seq, p.kind) for p in later.points] == [(2, "change"), (4, "start")]
    assert later.lastSeq == 4


def test_a_value_of_another_meter_generation_counts_as_empty() -> None:
    """A meter created again (or backfilled) has another startSeq: the old points go."""
    old = fold(None, _changes(DurationMeter(_meter(startSeq=0)), [1, 2]))
    new_meter = DurationMeter(_meter(startSeq=2))
    assert new_meter.change(_event("create", "10:00"), 2, _t("23:59")) is None  # not its event
    state = fold(old, _changes(new_meter, [3]))
    assert state is not None
    assert [p.seq for p in state.points] == [3] and state.meterStartSeq == 2


@pytest.mark.parametrize(
    ("data", "action", "expected"),
    [
        ({"resource_id": "vm-1"}, "create", ("start", None)),
        ({"resource_id": "vm-1", "vcpus": "8"}, "resize", ("change", Decimal(8))),
        ({"resource_id": "vm-1", "vcpus": True}, "resize", ("change", None)),  # not a number
        ({"resource_id": "vm-1", "vcpus": "x"}, "resize", ("change", None)),
        ({"resource_id": 7}, "delete", ("end", None)),  # any id, as text
        ({"resource_id": "vm-1"}, "reboot", None),  # an action the meter does not map
        ({}, "create", None),  # no resource
        ({"resource_id": None}, "create", None),
    ],
)
def test_what_an_event_becomes_for_a_duration_meter(
    data: dict[str, Any], action: str, expected: tuple[str, Decimal | None] | None
) -> None:
    """Resource, action and weight are read as the stream reader read them."""
    event = Event(
        id="e", eventType="t", subject="acme", time=None, data={"event_type": action, **data}
    )
    stored = _t("09:00")
    c = DurationMeter(_meter()).change(event, 5, stored)
    if expected is None:
        assert c is None
        return
    assert c is not None
    assert (c.point.kind, c.point.weight) == expected
    assert c.point.at == stored  # no event time: the time the stream stored it
    assert c.key == meter_key("vcpu", "acme", str(data["resource_id"]))


def test_metadata_comes_from_the_starts_in_stream_order_and_only_their_data_is_kept() -> None:
    """The last start event in stream order gives the metadata (a start stored later wins,
    whatever its event time); the first event and the last start keep their data, the other
    starts their type, region and name, the rest nothing."""
    dm = DurationMeter(_meter())
    events = [
        (1, _event("resize", "10:05", vcpus=4, region="xx")),
        (2, _event("create", "10:00", vcpus=2, region="bj", resource_type="instance")),
        (3, _event("power_off", "10:30")),
        (4, _event("power_on", "10:20", region="sh")),  # earlier in time, later in the stream
    ]
    for order in permutations(events):
        state = _fold_one_by_one(
            [c for seq, e in order if (c := dm.change(e, seq, _t("23:59"))) is not None]
        )
        assert state is not None
        view = resource_view(state)
        assert (view.region, view.resource_type) == ("sh", "instance")
        assert view.metadata["region"] == "sh" and view.metadata["tenant"] == "acme"
        kept = {p.seq: p.data for p in state.points if p.data is not None}
        assert kept.keys() == {1, 2, 4}
        assert kept[2] == {"region": "bj", "resource_type": "instance"}  # not the last start
        assert kept[4] == events[3][1].data and kept[1] == events[0][1].data
    only_change = fold(None, [c for c in [dm.change(events[0][1], 1, _t("23:59"))] if c])
    assert only_change is not None and resource_view(only_change).region == "xx"


def test_usage_points_give_the_same_hours_as_the_events() -> None:
    """CREATED / DESTROYED folded per resource, in any order, give the hours usage_hours gives
    from the events themselves; other events are not usage."""
    find = compile_path("$.location")

    def ev(kind: str, at: str, resource: str = "vm-1", **data: Any) -> Event:
        return Event(
            id=at,
            eventType="lifecycle",
            subject="acme",
            time=_t(at),
            data={"event": kind, "resource": resource, **data},
        )

    events = [
        ev("destroyed", "12:30", location="eu"),
        ev("CREATED", "10:00", location="eu"),
        ev("CREATED", "11:00", resource="vm-2"),
        ev("RESIZED", "10:30"),
    ]
    changes = [usage_change(e, i + 1, _t("23:59"), "lifecycle", find) for i, e in enumerate(events)]
    assert changes[3] is None
    states: dict[str, ResourceState] = {}
    for c in reversed([c for c in changes if c is not None]):
        states[c.key] = fold(states.get(c.key), [c]) or states[c.key]
    folded = [e for s in states.values() for e in usage_events(s)]
    start, end = _t("09:00"), _t("14:00")
    assert usage_hours(folded, start, end) == {"eu": 2.5, "unknown": 3.0}


# ---- over a real nats-server ----

VM = "compute.instance"


async def _vm_lifecycle(http: Http, prefix: str = "lc") -> None:
    """vm-1 (2 vCPU, 10:00 -> 11:00) and a usage resource, posted in a shuffled order."""
    rows: list[dict[str, Any]] = [
        {"eventType": VM, "time": "2026-11-20T10:00:00Z", "data": {"event_type": "create",
         "resource_id": "vm-1", "region": "bj", "resource_type": "instance", "vcpus": 2}},
        {"eventType": VM, "time": "2026-11-20T10:30:00Z", "data": {"event_type": "resize",
         "resource_id": "vm-1", "vcpus": 4}},
        {"eventType": VM, "time": "2026-11-20T11:00:00Z", "data": {"event_type": "delete",
         "resource_id": "vm-1"}},
        {"eventType": "lifecycle", "time": "2026-11-20T10:00:00Z", "data": {"event": "CREATED",
         "resource": "u-1", "location": "eu"}},
        {"eventType": "lifecycle", "time": "2026-11-20T12:00:00Z", "data": {"event": "DESTROYED",
         "resource": "u-1", "location": "eu"}},
    ]  # fmt: skip
    order = list(range(len(rows)))
    random.Random(7).shuffle(order)
    for i in order:
        await post_event(http, id=f"{prefix}{i}", subject="acme", **rows[i])


async def _answers(http: Http) -> dict[str, Any]:
    usage = await http.get(
        "/api/usage",
        params={"tenant": "acme", "start": "2026-11-20T00:00:00Z", "end": "2026-11-21T00:00:00Z"},
    )
    charging = await http.post(
        "/charging",
        json={"tenant": "acme", "start": "2026-11-20T00:00:00Z", "end": "2026-11-21T00:00:00Z"},
    )
    return {
        "records": await (await http.get("/v1/records/vm-1")).json(),
        "resources": await (await http.get("/v1/resources?tenant=acme")).json(),
        "charging": await charging.json(),
        "usage": (await usage.json())["usage"],
    }


async def _vcpu_meter(http: Http, meter_id: str = "vcpu") -> None:
    await create_meter(
        http, id=meter_id, eventType=VM, aggregation="duration", valueProperty="$.vcpus"
    )


async def _price(http: Http) -> None:
    resp = await http.post(
        "/v1/prices",
        json={"name": "vcpu-hour", "currency": "EUR", "unit_price": "0.06", "meter": "vcpu"},
    )
    assert resp.status == 201


async def _state(nc: Client) -> dict[str, bytes]:
    """Every key of the resources bucket and its value."""
    return dict(await scan(nc.jetstream(), "resources"))


async def _revisions(nc: Client) -> dict[str, int]:
    kv = await nc.jetstream().key_value("resources")
    out = {}
    for key in await _state(nc):
        entry = await kv.get(key)
        out[key] = entry.revision or 0
    return out


def _check_expected(answers: dict[str, Any]) -> None:
    recs = [(r["start_at"][11:16], r["end_at"][11:16], r["weight"]) for r in answers["records"]]
    assert recs == [("10:00", "10:30", "2"), ("10:30", "11:00", "4")]
    # 1800 s x 2 + 1800 s x 4 = 3 vCPU-hours at 0.06
    assert Decimal(answers["charging"]["totals"]["EUR"]) == Decimal("0.18")
    assert [(r["resource_id"], r["status"], r["region"]) for r in answers["resources"]] == [
        ("vm-1", "deleted", "bj")
    ]
    assert answers["usage"] == [{"location": "eu", "hours": 2.0}]


async def test_records_and_usage_survive_the_stream_losing_the_events(
    http: Http, nc: Client, worker: Worker
) -> None:
    """Once folded, the answers no longer need the events: purging every event from the
    stream (what METER_RETENTION does to old ones) leaves records, resources, charges and
    the usage summary exactly as they were."""
    await _vcpu_meter(http)
    await _price(http)
    await _vm_lifecycle(http)
    await lifecycle_folded(nc)
    before = await _answers(http)
    _check_expected(before)
    js = nc.jetstream()
    await js.purge_stream("meters")
    assert (await js.stream_info("meters")).state.messages == 0
    after = await _answers(http)
    assert after == before


async def test_a_replay_of_every_event_changes_no_value(
    http: Http, nc: Client, settings: Settings, worker: Worker
) -> None:
    """The lifecycle consumers deleted, so a new worker's consumers deliver every stored event
    again from the beginning: no key is written again, no answer changes."""
    await _vcpu_meter(http)
    await _price(http)
    await _vm_lifecycle(http)
    await lifecycle_folded(nc)
    values, revisions, answers = await _state(nc), await _revisions(nc), await _answers(http)
    assert len(values) == 4  # two resources, two markers
    await worker.stop()
    js = nc.jetstream()
    for event_type in (VM, "lifecycle"):
        await js.delete_consumer("meters", consumer_name(event_type))
    again = Worker(nc, settings)
    await again.start()
    try:
        await lifecycle_folded(nc)
        assert again.lifecycle is not None and again.lifecycle.folded == 5  # all read again
        assert await _state(nc) == values
        assert await _revisions(nc) == revisions
        assert await _answers(http) == answers
    finally:
        await again.stop()


async def test_a_meter_created_later_reads_its_history_after_a_backfill(
    http: Http, nc: Client, worker: Worker
) -> None:
    """A duration meter created after the events has none of them (they precede its start);
    a backfill moves its start back and the worker folds the history from the stream."""
    await _vcpu_meter(http)
    await _price(http)
    await _vm_lifecycle(http)
    await lifecycle_folded(nc)
    await _vcpu_meter(http, "vcpu2")
    await lifecycle_folded(nc)
    res = await (await http.get("/v1/resources")).json()
    assert [r["meter"] for r in res] == ["vcpu"]
    js = nc.jetstream()
    await backfill.start(js, Layout(Settings()), "vcpu2")
    await lifecycle_folded(nc)
    res = await (await http.get("/v1/resources")).json()
    assert [(r["meter"], r["resource_id"], r["status"]) for r in res] == [
        ("vcpu", "vm-1", "deleted"),
        ("vcpu2", "vm-1", "deleted"),
    ]
    recs = await (await http.get("/v1/records/vm-1")).json()
    by_meter = {m: [(r["start_at"], r["end_at"], r["weight"]) for r in recs if r["meter"] == m]
                for m in ("vcpu", "vcpu2")}  # fmt: skip
    assert by_meter["vcpu"] == by_meter["vcpu2"] and len(by_meter["vcpu"]) == 2


async def test_a_meter_deleted_and_created_again_starts_empty(
    http: Http, nc: Client, worker: Worker
) -> None:
    """The old generation's resources go with the meter; the new one sees new events only."""
    await _vcpu_meter(http)
    await _vm_lifecycle(http)
    await lifecycle_folded(nc)
    assert len(await (await http.get("/v1/resources")).json()) == 1
    assert (await http.delete("/api/v1/meters/vcpu")).status == 204
    await _vcpu_meter(http)
    await lifecycle_folded(nc)
    assert await (await http.get("/v1/resources")).json() == []
    await post_event(
        http,
        id="new-1",
        eventType=VM,
        subject="acme",
        time="2026-11-21T10:00:00Z",
        data={"event_type": "create", "resource_id": "vm-9", "vcpus": 1},
    )
    await lifecycle_folded(nc)
    res = await (await http.get("/v1/resources")).json()
    assert [(r["resource_id"], r["status"]) for r in res] == [("vm-9", "running")]


@pytest.mark.parametrize("lose", ["bucket", "bucket and consumers"])
async def test_an_install_without_the_bucket_is_rebuilt_from_the_stream(
    http: Http, nc: Client, settings: Settings, worker: Worker, lose: str
) -> None:
    """Delete the resources bucket (and the lifecycle consumers): the next worker start makes
    it again and fills it from the stream - the same values, the same answers."""
    await _vcpu_meter(http)
    await _price(http)
    await _vm_lifecycle(http)
    await lifecycle_folded(nc)
    values, answers = await _state(nc), await _answers(http)
    await worker.stop()
    js = nc.jetstream()
    await js.delete_key_value("resources")
    if lose == "bucket and consumers":
        for event_type in (VM, "lifecycle"):
            await js.delete_consumer("meters", consumer_name(event_type))
    again = Worker(nc, settings)
    await again.start()
    try:
        await lifecycle_folded(nc)
        rebuilt = await _state(nc)
        assert _resources_only(rebuilt) == _resources_only(values) != {}
        assert await _answers(http) == answers
        if lose == "bucket":  # the consumers had passed the events: read from the stream
            assert rebuilt["done.meter.vcpu"] == b'{"startSeq":0,"through":5}'
    finally:
        await again.stop()


def _resources_only(values: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in values.items() if not k.startswith("done.")}


async def test_two_workers_fold_a_shuffled_lifecycle_exactly_once(
    http: Http, nc: Client, settings: Settings, worker: Worker
) -> None:
    """Two workers pull the same consumers while 60 events of 12 resources arrive shuffled:
    every resource holds each of its events once, in event-time order."""
    second = Worker(nc, settings)
    await second.start()
    try:
        await _vcpu_meter(http)
        await lifecycle_folded(nc)
        actions = ["create", "resize", "power_off", "power_on", "delete"]
        rows = [(vm, i) for vm in range(12) for i in range(5)]
        random.Random(11).shuffle(rows)
        for n, (vm, i) in enumerate(rows):
            await post_event(
                http,
                id=f"e{n}",
                eventType=VM,
                subject="acme",
                time=f"2026-11-20T1{i}:00:00Z",
                data={"event_type": actions[i], "resource_id": f"vm-{vm}", "vcpus": i + 1},
            )
        await lifecycle_folded(nc)
        states = [
            msgspec.json.decode(v, type=ResourceState)
            for k, v in (await _state(nc)).items()
            if k.startswith("meter.")
        ]
        assert len(states) == 12
        for s in states:
            assert [p.kind for p in s.points] == ["start", "change", "stop", "start", "end"]
            assert len({p.seq for p in s.points}) == 5
        assert worker.lifecycle is not None and second.lifecycle is not None
        assert worker.lifecycle.folded + second.lifecycle.folded >= 60
    finally:
        await second.stop()


def test_points_round_trip_through_json_exactly() -> None:
    """Times, decimals and data survive the KV value."""
    p = LifecyclePoint(at=_t("10:00"), seq=3, kind="start", weight=Decimal("2.50"), data={"a": 1})
    state = ResourceState(tenant="acme", resource="vm-1", lastSeq=3, points=[p], meter="m")
    from kloudmeter_py.core.lifecycle import state_decoder, state_encoder

    back = state_decoder.decode(state_encoder.encode(state))
    assert back == state and back.points[0].at.tzinfo is not None
    assert back.points[0].at == datetime(2026, 11, 20, 10, tzinfo=UTC)


async def test_an_event_whose_body_names_another_tenant_than_its_subject_is_not_folded(
    http: Http, nc: Client, worker: Worker
) -> None:
    """Published on acme's subject (all a tenant's NATS user may publish to) but naming globex
    in its body: no resource for either (the main worker dead-letters it)."""
    from kloudmeter_py.core.keys import event_subject

    await _vcpu_meter(http)
    await lifecycle_folded(nc)
    body = {
        "id": "forged",
        "eventType": VM,
        "subject": "globex",
        "time": "2026-11-20T10:00:00Z",
        "data": {"event_type": "create", "resource_id": "vm-x"},
    }
    js = nc.jetstream()
    await js.publish(event_subject("meters", VM, "acme"), msgspec.json.encode(body))
    await post_event(http, **{**body, "id": "real", "subject": "acme"})
    await lifecycle_folded(nc)
    res = await (await http.get("/v1/resources")).json()
    assert [(r["tenant_id"], r["resource_id"]) for r in res] == [("acme", "vm-x")]


async def test_a_resource_too_large_for_one_value_does_not_stop_the_others(
    http: Http, nc: Client, worker: Worker
) -> None:
    """Two create events of 600 kB each cannot share one KV value (1 MiB): that resource's
    write is refused and logged, and the consumer goes on with the other resources."""
    from structlog.testing import capture_logs

    from tests.helpers import publish_event

    await _vcpu_meter(http)
    await lifecycle_folded(nc)
    with capture_logs() as logs:
        for i in range(2):
            await publish_event(
                nc,
                id=f"big{i}",
                eventType=VM,
                subject="acme",
                time=f"2026-11-20T1{i}:00:00Z",
                data={"event_type": "create", "resource_id": "vm-big", "blob": "x" * 600_000},
            )
        await post_event(
            http,
            id="small",
            eventType=VM,
            subject="acme",
            time="2026-11-20T12:00:00Z",
            data={"event_type": "create", "resource_id": "vm-small"},
        )
        await lifecycle_folded(nc)
    res = await (await http.get("/v1/resources")).json()
    assert "vm-small" in [r["resource_id"] for r in res]
    assert worker.lifecycle is not None and worker.lifecycle.too_large >= 1
    assert any(e["event"] == "lifecycle.value_too_large" for e in logs)


def _metadata_read_in_stream_order(
    events: list[tuple[int, Event]], dm: DurationMeter
) -> tuple[Any, ...]:
    """What the reader of the stream made of a resource's events (the rule before the fold):
    in stream order, the first event and every start set the metadata."""
    rtype = region = name = None
    metadata: dict[str, Any] = {}
    for seq, e in sorted(events, key=lambda x: x[0]):
        c = dm.change(e, seq, _t("23:59"))
        if c is None:
            continue
        if c.point.kind == "start" or not metadata:
            rtype = e.data.get("resource_type", rtype)
            region = e.data.get("region", region)
            name = e.data.get("resource_name", name)
            metadata = {
                **{k: v for k, v in e.data.items() if isinstance(v, str | int | float)},
                "tenant": e.subject,
                "resource_id": "vm-1",
                "meter": dm.meter.id,
            }
    return rtype, region, name, metadata


def test_folded_metadata_equals_the_stream_readers_for_random_lifecycles() -> None:
    """300 random lifecycles (random actions, random subsets of type/region/name/extra
    fields), folded in a random order: the same type, region, name and metadata as reading
    the events in stream order."""
    dm = DurationMeter(_meter())
    rnd = random.Random(5)
    actions = ["create", "resize", "power_off", "power_on", "delete", "reboot"]
    for _ in range(300):
        events = []
        for seq in range(1, rnd.randint(1, 8) + 1):
            data: dict[str, Any] = {}
            for field in ("resource_type", "region", "resource_name", "flavor", "vcpus"):
                if rnd.random() < 0.4:
                    data[field] = rnd.choice(["a", "b", 3])
            e = _event(rnd.choice(actions), f"1{rnd.randint(0, 9)}:00", **data)
            events.append((seq, e))
        order = events[:]
        rnd.shuffle(order)
        state = _fold_one_by_one(
            [c for seq, e in order if (c := dm.change(e, seq, _t("23:59"))) is not None]
        )
        expected = _metadata_read_in_stream_order(events, dm)
        if state is None:
            assert expected == (None, None, None, {})
            continue
        view = resource_view(state)
        assert (view.resource_type, view.region, view.name, view.metadata) == expected


async def test_a_worker_with_a_stale_meter_view_never_overwrites_a_newer_generation(
    http: Http, nc: Client, settings: Settings, worker: Worker
) -> None:
    """A meter backfilled (new startSeq) while another worker's view still has the old one:
    that worker's fold of an event meets a value of another generation, catches its view up,
    finds itself stale and gives the batch back (StaleView) instead of wiping the state."""
    from kloudmeter_py.store.meters import MeterRegistry
    from kloudmeter_py.worker.lifecycle import LifecycleFolder, StaleView

    js = nc.jetstream()
    layout = Layout(settings)
    early = {"eventType": VM, "subject": "acme", "time": "2026-11-20T09:00:00Z"}
    await post_event(http, id="early", **early, data={"event_type": "create", "resource_id": "a"})
    await _vcpu_meter(http)  # startSeq 1: the event above is not its own
    await post_event(http, id="late", **{**early, "time": "2026-11-20T11:00:00Z"},
                     data={"event_type": "delete", "resource_id": "a"})  # fmt: skip
    await lifecycle_folded(nc)
    stale = MeterRegistry(js, layout)
    await stale.start()
    await stale.stop()  # its view stays at startSeq 1
    old_meter = stale.by_id["vcpu"].meter
    assert old_meter.startSeq == 1
    await backfill.start(js, layout, "vcpu")  # startSeq 0
    await lifecycle_folded(nc)
    values = await _state(nc)
    key = meter_key("vcpu", "acme", "a")
    assert [p.seq for p in msgspec.json.decode(values[key], type=ResourceState).points] == [1, 2]
    folder = LifecycleFolder(js, settings, layout, stale)
    folder.kv = await js.key_value(layout.resources_bucket)
    event = Event(id="late", eventType=VM, subject="acme", time=_t("11:00"),
                  data={"event_type": "delete", "resource_id": "a"})  # fmt: skip
    change = DurationMeter(old_meter).change(event, 2, _t("11:00"))
    assert change is not None and change.key == key
    with pytest.raises(StaleView):
        await folder._write(key, [change])
    assert stale.by_id["vcpu"].meter.startSeq == 0  # caught up
    await stale.stop()
    assert await _state(nc) == values


async def test_a_consumer_deleted_under_a_running_worker_is_made_again(
    http: Http, nc: Client, worker: Worker
) -> None:
    """The worker notices its lifecycle consumer is gone, makes it again from the beginning
    of the stream, folds what came meanwhile, and what it reads again changes nothing."""
    await _vcpu_meter(http)
    await _price(http)
    await _vm_lifecycle(http)
    await lifecycle_folded(nc)
    values, revisions = await _state(nc), await _revisions(nc)
    await nc.jetstream().delete_consumer("meters", consumer_name(VM))
    await post_event(
        http,
        id="after",
        eventType=VM,
        subject="acme",
        time="2026-11-21T10:00:00Z",
        data={"event_type": "create", "resource_id": "vm-2", "vcpus": 1},
    )
    await lifecycle_folded(nc)
    now, now_revisions = await _state(nc), await _revisions(nc)
    new_key = meter_key("vcpu", "acme", "vm-2")
    assert now.pop(new_key) and now_revisions.pop(new_key)
    assert now == values and now_revisions == revisions


@pytest.mark.parametrize("corrected", [False, True], ids=["events", "with-corrections"])
async def test_a_worker_killed_while_folding_loses_and_doubles_nothing(
    nc: Client, settings: Settings, tmp_path: Path, corrected: bool
) -> None:
    """300 resources' lifecycles (1,500 events, shuffled) arrive while the worker process is
    SIGKILLed three times at random moments after the lifecycle consumer made progress: every
    resource ends with each of its five events once, in event-time order. With corrections
    among them (some time after their originals): a third of the resizes moved from 11:00 to
    11:30 and a third of the power-ons cancelled, each applied once."""
    from kloudmeter_py.core.corrections import correction_id
    from kloudmeter_py.core.keys import event_subject
    from kloudmeter_py.core.models import MeterIn
    from kloudmeter_py.store.meters import MeterStore
    from tests.conftest import eventually
    from tests.load import WorkerProcess

    js = nc.jetstream()
    await MeterStore(js, Layout(settings)).create(
        msgspec.convert(
            {"id": "vcpu", "eventType": VM, "aggregation": "duration", "valueProperty": "$.vcpus"},
            MeterIn,
        )
    )
    actions = ["create", "resize", "power_off", "power_on", "delete"]
    rows = [(vm, i) for vm in range(300) for i in range(5)]
    rng = random.Random(13)
    rng.shuffle(rows)

    # (resource, action index) -> the correction made of it: 1 (resize) amended, 3 cancelled
    fixes = {(vm, 1): "amend" for vm in range(0, 300, 3)} if corrected else {}
    fixes.update({(vm, 3): "cancel" for vm in range(1, 300, 3)} if corrected else {})
    later: list[tuple[int, dict[str, Any]]] = []  # (publish after row n, correction body)

    async def publish() -> None:
        for n, (vm, i) in enumerate(rows):
            body = {
                "id": f"k{n}",
                "eventType": VM,
                "subject": f"t{vm % 3}",
                "time": f"2026-11-20T1{i}:00:00Z",
                "data": {"event_type": actions[i], "resource_id": f"vm-{vm}", "vcpus": i + 1},
            }
            subject = event_subject("meters", VM, body["subject"])
            ack = await js.publish(subject, msgspec.json.encode(body))
            action = fixes.get((vm, i))
            if action is not None:
                fix: dict[str, Any] = {
                    "eventType": VM,
                    "subject": body["subject"],
                    "correction": {"action": action, "of": body["id"], "seq": ack.seq},
                }
                when = None
                if action == "amend":
                    when = datetime(2026, 11, 20, 11, 30, tzinfo=UTC)
                    fix["time"] = "2026-11-20T11:30:00Z"
                    fix["data"] = body["data"]
                fix["id"] = correction_id(ack.seq, action, fix.get("data"), when)
                later.append((rng.randrange(n, len(rows)), fix))
            for fix in [f for at, f in later if at == n]:
                await js.publish(
                    event_subject("meters", VM, fix["subject"]),
                    msgspec.json.encode(fix),
                    headers={"Nats-Msg-Id": fix["id"]},
                )
            if n % 25 == 24:
                await asyncio.sleep(
                    0.2
                )  # paced (~12 s), so that the kills fall while events arrive

    async def acked() -> int:
        try:
            info = await js.consumer_info("meters", consumer_name(VM))
        except NotFoundError:
            return 0
        return int(info.ack_floor.stream_seq or 0)

    env = {"NATS_URL": settings.nats_url, "METER_PARTITIONS": "2"}
    publisher = asyncio.create_task(publish())
    worker = await WorkerProcess(env, tmp_path / "worker.log").start()
    kills = 0
    try:
        for _ in range(3):
            seen = await acked()
            await eventually(
                acked, lambda pos, seen=seen: pos > seen or publisher.done(), timeout=60
            )
            await asyncio.sleep(rng.uniform(0.0, 0.3))  # a random crash point, not a wait
            await worker.kill()
            kills += 1
            worker = await WorkerProcess(env, tmp_path / "worker.log").start()
        await publisher
        await lifecycle_folded(nc, timeout=90)
    finally:
        await worker.stop()
    states = [
        msgspec.json.decode(v, type=ResourceState)
        for k, v in (await _state(nc)).items()
        if k.startswith("meter.")
    ]
    assert kills == 3 and len(states) == 300
    for s in states:
        vm = int(s.resource.removeprefix("vm-"))
        kinds = ["start", "change", "stop", "start", "end"]
        hours = [10, 11, 12, 13, 14]
        if fixes.get((vm, 3)) == "cancel":
            del kinds[3], hours[3]
        assert [p.kind for p in s.points] == kinds
        assert [p.at.hour for p in s.points] == hours
        assert len({p.seq for p in s.points}) == len(kinds)
        resize = s.points[1]
        assert resize.at.minute == (30 if fixes.get((vm, 1)) == "amend" else 0)


async def test_records_charges_and_usage_follow_corrections(
    http: Http, nc: Client, worker: Worker
) -> None:
    """The resize amended to 10:45 and the delete to 11:30, the usage resource's DESTROYED
    amended to 11:00 and its CREATED cancelled then amended back: records, charges and usage
    hours equal the events corrected by hand; a repeated correction changes nothing."""
    await _vcpu_meter(http)
    await _price(http)
    await _vm_lifecycle(http)
    await lifecycle_folded(nc)
    _check_expected(await _answers(http))

    async def correct(event_id: str, action: str, body: dict[str, Any] | None = None) -> None:
        resp = await http.post(f"/api/events/{event_id}/{action}", json=body or {})
        assert resp.status == 202, await resp.text()

    await correct("lc1", "amend", {"time": "2026-11-20T10:45:00Z"})
    await correct("lc2", "amend", {"time": "2026-11-20T11:30:00Z"})
    await correct("lc4", "amend", {"time": "2026-11-20T11:00:00Z"})
    await correct("lc3", "cancel")
    await correct("lc3", "amend", {"time": "2026-11-20T10:00:00Z"})
    await correct("lc2", "amend", {"time": "2026-11-20T11:30:00Z"})  # a retry
    await lifecycle_folded(nc)
    answers = await _answers(http)
    recs = [(r["start_at"][11:16], r["end_at"][11:16], r["weight"]) for r in answers["records"]]
    assert recs == [("10:00", "10:45", "2"), ("10:45", "11:30", "4")]
    # 2700 s x 2 + 2700 s x 4 = 4.5 vCPU-hours at 0.06
    assert Decimal(answers["charging"]["totals"]["EUR"]) == Decimal("0.27")
    assert answers["usage"] == [{"location": "eu", "hours": 1.0}]
    # the duration meter's reading counts the events, corrections taken into account
    resp = await http.get("/api/readings", params={"meter": "vcpu"})
    assert [r["value"] for r in await resp.json()] == [3]
