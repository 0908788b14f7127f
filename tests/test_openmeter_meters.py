"""The rest of OpenMeter's meters on the v1 wire - updates, group-by values, the event list and
CSV answers - driven through the official openmeter SDK, unchanged, against a live gateway,
worker and nats-server."""

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from corehttp.exceptions import HttpResponseError
from nats.aio.client import Client
from openmeter.aio import Client as OpenMeter

from kloudmeter_py.config import Settings
from kloudmeter_py.gateway import create_app
from kloudmeter_py.worker import Worker
from tests.conftest import eventually
from tests.helpers import Http, post_event, publish_event, readings, total_count

ADMIN_TOKEN = "admin-token-for-openmeter-meters-0123"


def _endpoint(http: Http) -> str:
    return str(http.make_url("")).rstrip("/")


def _client(http: Http, token: str | None = None) -> OpenMeter:
    return OpenMeter(endpoint=_endpoint(http), token=token, retry_total=0)


def _z(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _event(event_id: str, subject: str, t: datetime, **data: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "source": "tests",
        "specversion": "1.0",
        "type": "prompt",
        "subject": subject,
        "time": _z(t),
        "data": data,
    }


async def _tokens_meter(om: OpenMeter, **extra: Any) -> None:
    await om.meters.create(
        {
            "slug": "tokens",
            "aggregation": "SUM",
            "eventType": "prompt",
            "valueProperty": "$.tokens",
            "groupBy": {"model": "$.model"},
            **extra,
        }
    )


def _problem(err: pytest.ExceptionInfo[HttpResponseError]) -> dict[str, Any]:
    assert err.value.response is not None
    body: dict[str, Any] = err.value.response.json()
    return body


async def _start_seq(http: Http, meter: str) -> int:
    resp = await http.get("/api/meter/", params={"key": meter})
    assert resp.status == 200, await resp.text()
    seq: int = (await resp.json())["startSeq"]
    return seq


@pytest.fixture
async def secured(nc: Client, settings: Settings) -> AsyncIterator[Http]:
    """A second gateway on the same NATS, with API tokens on."""
    on = Settings(
        nats_url=settings.nats_url,
        partitions=settings.partitions,
        admin_token=ADMIN_TOKEN,
        summary_flush_ms=0,
    )
    async with TestClient(TestServer(create_app(on, nc))) as client:
        yield client


async def _user_token(secured: Http, tenant: str) -> str:
    resp = await secured.post(
        "/api/users",
        json={"tenant": tenant},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert resp.status == 201, await resp.text()
    token: str = (await resp.json())["token"]
    return token


# -- PUT /api/v1/meters/{idOrSlug} ---------------------------------------------------------


async def test_update_changes_name_and_description_in_place(http: Http, worker: Worker) -> None:
    """A new name and description are stored; the meter's generation and counts stay."""
    now = datetime.now(UTC)
    async with _client(http) as om:
        await _tokens_meter(om, description="before")
        await om.events.ingest_event(_event("a", "acme", now, tokens=3, model="gpt"))
        await eventually(lambda: readings(http, meter="tokens"), lambda r: total_count(r) == 1)
        start = await _start_seq(http, "tokens")

        updated = await om.meters.update("tokens", {"name": "Tokens", "description": "after"})
        assert (updated.name, updated.description) == ("Tokens", "after")
        assert updated.updated_at >= updated.created_at
        got = await om.meters.get("tokens")
        assert (got.name, got.description, got.group_by) == (
            "Tokens",
            "after",
            {"model": "$.model"},
        )
        assert await _start_seq(http, "tokens") == start

        await om.events.ingest_event(_event("b", "acme", now, tokens=4, model="gpt"))
        rs = await eventually(lambda: readings(http, meter="tokens"), lambda r: total_count(r) == 2)
        assert rs[0]["value"] == 7


async def test_update_refuses_what_cannot_change_naming_the_field(http: Http) -> None:
    """Slug, event type, aggregation, value property, a key's path or its removal: 400 with
    the field and why; the same values sent back are accepted."""
    async with _client(http) as om:
        await _tokens_meter(om)
        refusals: list[tuple[dict[str, Any], str, str]] = [
            ({"slug": "other"}, "slug", "slug is its id"),
            ({"eventType": "chat"}, "eventType", "new meter"),
            (
                {"aggregation": "MAX"},
                "aggregation",
                "changing a meter's aggregation or value means a new meter and a backfill",
            ),
            (
                {"valueProperty": "$.n"},
                "valueProperty",
                "changing a meter's aggregation or value means a new meter and a backfill",
            ),
            ({"groupBy": {"model": "$.m"}}, "groupBy.model", "path cannot change"),
            ({"groupBy": {}}, "groupBy.model", "cannot be removed"),
            ({"groupBy": {"model": "$.model", "bad": "$["}}, "groupBy.bad", "groupBy.bad"),
        ]
        for body, field, why in refusals:
            with pytest.raises(HttpResponseError) as err:
                await om.meters.update("tokens", body)
            assert err.value.status_code == 400, body
            problem = _problem(err)
            assert problem["field"] == field, problem
            assert why in problem["detail"], problem
        same = {
            "slug": "tokens",
            "eventType": "prompt",
            "aggregation": "sum",
            "valueProperty": "$.tokens",
            "groupBy": {"model": "$.model"},
            "description": "kept",
        }
        assert (await om.meters.update("tokens", same)).description == "kept"
        meter = await om.meters.get("tokens")
        assert (meter.aggregation, meter.value_property) == ("SUM", "$.tokens")
    resp = await http.put("/api/v1/meters/nope", json={"name": "x"})
    assert resp.status == 404 and resp.content_type == "application/problem+json"


async def test_group_by_key_added_while_the_meter_has_counted_nothing(
    http: Http, worker: Worker
) -> None:
    """A key added before any event of the meter's type: a new generation from the stream's
    last sequence, and events from then on are split by it."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    async with _client(http) as om:
        await _tokens_meter(om)
        first = await _start_seq(http, "tokens")
        with pytest.raises(HttpResponseError) as err:  # nothing stored since: cannot move
            await om.meters.update("tokens", {"groupBy": {"model": "$.model", "team": "$.t"}})
        assert err.value.status_code == 400 and _problem(err)["field"] == "groupBy"
        assert "stored nothing since the meter began" in _problem(err)["detail"]

        other = {**_event("x", "acme", now), "type": "login"}  # another type: not counted
        await om.events.ingest_event(other)
        updated = await om.meters.update(
            "tokens", {"groupBy": {"model": "$.model", "team": "$.team"}}
        )
        assert updated.group_by == {"model": "$.model", "team": "$.team"}
        assert await _start_seq(http, "tokens") == first + 1

        await om.events.ingest_events(
            [
                _event("1", "acme", now, tokens=5, model="gpt", team="red"),
                _event("2", "acme", now, tokens=6, model="gpt", team="blue"),
            ]
        )
        await eventually(lambda: readings(http, meter="tokens"), lambda r: total_count(r) == 2)
        result = await om.meters.query_json(
            "tokens",
            from_parameter=now,
            to=now + timedelta(hours=1),
            group_by=["team"],
        )
        assert sorted((r.group_by["team"], r.value) for r in result.data) == [
            ("blue", 6.0),
            ("red", 5.0),
        ]


async def test_group_by_key_refused_once_the_meter_has_counted(http: Http, worker: Worker) -> None:
    """A meter with counted events takes no new key: 400 on groupBy, saying it needs a new
    meter and a backfill; the meter is unchanged."""
    async with _client(http) as om:
        await _tokens_meter(om)
        await om.events.ingest_event(_event("a", "acme", datetime.now(UTC), tokens=1, model="m"))
        with pytest.raises(HttpResponseError) as err:
            await om.meters.update("tokens", {"groupBy": {"model": "$.model", "team": "$.t"}})
        assert err.value.status_code == 400
        problem = _problem(err)
        assert problem["field"] == "groupBy"
        assert "counted 1 stored event" in problem["detail"]
        assert "new meter" in problem["detail"] and "backfill" in problem["detail"]
        assert (await om.meters.get("tokens")).group_by == {"model": "$.model"}


# -- GET /api/v1/meters/{idOrSlug}/group-by/{key}/values ------------------------------------


async def test_group_by_values_are_the_callers_own(
    http: Http, secured: Http, worker: Worker
) -> None:
    """An admin sees every subject's values, a user its own subject's only; from/to keep the
    readings with an event in range; a key the meter lacks is a 400."""
    now = datetime.now(UTC)
    async with _client(http) as om:
        await _tokens_meter(om)
        await om.events.ingest_events(
            [
                _event("1", "acme", now - timedelta(minutes=5), tokens=1, model="gpt"),
                _event("2", "acme", now - timedelta(hours=3), tokens=1, model="llama"),
                _event("3", "globex", now - timedelta(minutes=5), tokens=1, model="claude"),
                _event("4", "globex", now - timedelta(days=3), tokens=1, model="old"),
            ]
        )
        await eventually(lambda: readings(http, meter="tokens"), lambda r: total_count(r) == 4)
    acme = await _user_token(secured, "acme")
    async with _client(secured, ADMIN_TOKEN) as admin, _client(secured, acme) as user:
        # (default from: 24 hours ago, as OpenMeter's)
        assert await admin.meters.list_group_by_values("tokens", "model") == [
            "claude",
            "gpt",
            "llama",
        ]
        assert await user.meters.list_group_by_values("tokens", "model") == ["gpt", "llama"]
        recent = await user.meters.list_group_by_values(
            "tokens", "model", from_parameter=now - timedelta(hours=1)
        )
        assert recent == ["gpt"]
        older = await admin.meters.list_group_by_values(
            "tokens",
            "model",
            from_parameter=now - timedelta(days=7),
            to=now - timedelta(hours=1),
        )
        assert older == ["llama", "old"]
        with pytest.raises(HttpResponseError) as err:
            await user.meters.list_group_by_values("tokens", "team")
        assert err.value.status_code == 400 and _problem(err)["field"] == "groupByKey"


# -- GET /api/v1/events ---------------------------------------------------------------------


async def test_events_are_listed_newest_first_with_each_filter(http: Http) -> None:
    """Newest stored first, in OpenMeter's IngestedEvent shape; limit, id and subject (parts),
    from/to on the event time (from: 72 hours back by default), ingestedAtFrom/To."""
    now = datetime.now(UTC).replace(microsecond=0)
    async with _client(http) as om:
        for i in range(5):
            subject = "acme-1" if i % 2 == 0 else "globex"
            await om.events.ingest_event(
                _event(f"evt-{i}", subject, now - timedelta(minutes=10 - i), n=i)
            )
        await om.events.ingest_event(_event("ancient", "acme-1", now - timedelta(days=10), n=9))
        await post_event(http, id="km-1", eventType="login", subject="acme-2", data={"u": 1})

        listed = await om.events.list()
        assert [e.event.id for e in listed] == ["km-1", "evt-4", "evt-3", "evt-2", "evt-1", "evt-0"]
        top = listed[1]
        assert (top.event.source, top.event.type, top.event.subject) == (
            "tests",
            "prompt",
            "acme-1",
        )
        assert top.event.specversion == "1.0" and top.event.data == {"n": 4}
        assert top.event.time == now - timedelta(minutes=6)
        assert top.ingested_at == top.stored_at and top.stored_at >= listed[2].stored_at
        assert listed[0].event.source == "kloudmeter" and listed[0].event.type == "login"

        assert [e.event.id for e in await om.events.list(limit=2)] == ["km-1", "evt-4"]
        assert [e.event.id for e in await om.events.list(id="vt-3")] == ["evt-3"]
        assert [e.event.id for e in await om.events.list(subject="globex")] == ["evt-3", "evt-1"]
        assert [e.event.id for e in await om.events.list(subject="acme")] == [
            "km-1",
            "evt-4",
            "evt-2",
            "evt-0",
        ]
        window = await om.events.list(
            from_parameter=now - timedelta(minutes=9), to=now - timedelta(minutes=7)
        )
        assert [e.event.id for e in window] == ["evt-3", "evt-2", "evt-1"]
        old = await om.events.list(from_parameter=now - timedelta(days=30), subject="acme-1")
        assert [e.event.id for e in old] == ["ancient", "evt-4", "evt-2", "evt-0"]
        # (with ingestedAtFrom, from has no default: the old event time shows)
        since = await om.events.list(ingested_at_from=listed[1].stored_at)
        assert [e.event.id for e in since] == ["km-1", "ancient", "evt-4"]
        until = await om.events.list(ingested_at_to=listed[2].stored_at)
        assert [e.event.id for e in until] == ["evt-3", "evt-2", "evt-1", "evt-0"]
        for limit in (0, 101):
            with pytest.raises(HttpResponseError) as err:
                await om.events.list(limit=limit)
            assert err.value.status_code == 400 and _problem(err)["field"] == "limit"
    resp = await http.get("/api/v1/events", params={"from": "yesterday"})
    assert resp.status == 400 and (await resp.json())["field"] == "from"


async def test_events_list_shows_a_user_only_its_own_subject(http: Http, secured: Http) -> None:
    """A user's token lists its own subject's events; another tenant's never show, asked for
    by subject or not."""
    now = datetime.now(UTC)
    async with _client(http) as om:
        await om.events.ingest_events(
            [
                _event("a1", "acme", now),
                _event("g1", "globex", now),
                _event("a2", "acme", now),
                _event("g2", "acme-globex", now),
            ]
        )
    acme = await _user_token(secured, "acme")
    async with _client(secured, acme) as user:
        assert [e.event.id for e in await user.events.list()] == ["a2", "a1"]
        assert await user.events.list(subject="globex") == []
        assert await user.events.list(id="g1") == []
    async with _client(secured, ADMIN_TOKEN) as admin:
        assert [e.event.id for e in await admin.events.list(subject="globex")] == ["g2", "g1"]


async def test_events_list_reads_back_across_many_ranges(
    http: Http, secured: Http, nc: Client
) -> None:
    """Events spread over more stored messages than one read range holds come back complete
    and newest first, for a partial subject (admin) and a user's own subject."""
    for i in range(700):
        subject = "acme" if i % 7 == 0 else f"other-{i % 3}"
        await publish_event(nc, id=f"e{i}", eventType="call", subject=subject)
    expected = [f"e{i}" for i in reversed(range(0, 700, 7))]
    assert len(expected) == 100
    async with _client(http) as om:
        assert [e.event.id for e in await om.events.list(subject="acm")] == expected
        assert [e.event.id for e in await om.events.list(id="e69")] == [
            "e699",
            "e698",
            "e697",
            "e696",
            "e695",
            "e694",
            "e693",
            "e692",
            "e691",
            "e690",
            "e69",
        ]
    acme = await _user_token(secured, "acme")
    async with _client(secured, acme) as user:
        assert [e.event.id for e in await user.events.list(limit=30)] == expected[:30]
        assert [e.event.id for e in await user.events.list()] == expected


# -- the query as CSV -----------------------------------------------------------------------


async def test_query_answers_csv_on_accept_text_csv(http: Http, worker: Worker) -> None:
    """query_csv (GET) and query_csv_post: window_start, window_end, subject, the groups asked
    for, value; by window, then subject."""
    # Two hours back, so that every event (the last at base + 61 min) is in the past whatever
    # the minute: from one hour back, the total below missed it in each hour's first minute.
    base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    async with _client(http) as om:
        await _tokens_meter(om)
        await om.events.ingest_events(
            [
                _event("1", "acme", base, tokens=10, model="gpt"),
                _event("2", "globex", base + timedelta(minutes=5), tokens=2, model="llama"),
                _event("3", "acme", base + timedelta(minutes=61), tokens=5, model="gpt"),
            ]
        )
        await eventually(lambda: readings(http, meter="tokens"), lambda r: total_count(r) == 3)
        text = await om.meters.query_csv(
            "tokens",
            from_parameter=base,
            to=base + timedelta(hours=2),
            window_size="HOUR",
            group_by=["subject", "model"],
        )
        rows = list(csv.reader(io.StringIO(text)))
        h0, h1, h2 = (_z(base + timedelta(hours=i)) for i in range(3))
        assert rows == [
            ["window_start", "window_end", "subject", "model", "value"],
            [h0, h1, "acme", "gpt", "10"],
            [h0, h1, "globex", "llama", "2"],
            [h1, h2, "acme", "gpt", "5"],
        ]
        total = await om.meters.query_csv_post("tokens")
        assert list(csv.reader(io.StringIO(total)))[1][2:] == ["", "17"]
    resp = await http.get(
        "/api/v1/meters/tokens/query", headers={"Accept": "text/csv, application/json"}
    )
    assert resp.content_type == "text/csv"
    resp = await http.get("/api/v1/meters/tokens/query")
    assert resp.content_type == "application/json"


# -- pure pieces ----------------------------------------------------------------------------


def test_update_meter_keeps_what_it_may_not_change() -> None:
    """core.models.update_meter: labels and new keys change, the rest is refused by name."""
    from kloudmeter_py.core.models import InvalidField, Meter, update_meter

    t = datetime(2026, 1, 1, tzinfo=UTC)
    meter = Meter(
        id="m",
        eventType="e",
        aggregation="sum",
        valueProperty="$.v",
        groupBy={"b": "$.b"},
        createdAt=t,
        startSeq=7,
    )
    new = update_meter(meter, name="M", group_by={"b": "$.b", "a": "$.a"}, now=t)
    assert (new.name, list(new.groupBy), new.startSeq, new.updatedAt) == ("M", ["a", "b"], 7, t)
    assert update_meter(meter, fixed={"aggregation": "SUM", "slug": "m"}, now=t).groupBy == {
        "b": "$.b"
    }
    for kw, field in (
        ({"fixed": {"aggregation": "count"}}, "aggregation"),
        ({"fixed": {"valueProperty": "$.w"}}, "valueProperty"),
        ({"fixed": {"eventType": "f"}}, "eventType"),
        ({"fixed": {"slug": "n"}}, "slug"),
        ({"group_by": {"b": "$.c"}}, "groupBy.b"),
        ({"group_by": {"a": "$.a"}}, "groupBy.b"),
    ):
        with pytest.raises(InvalidField) as err:
            update_meter(meter, now=t, **kw)  # type: ignore[arg-type]
        assert err.value.field == field


def test_openmeter_csv_quotes_what_needs_it() -> None:
    """A group value with a comma or a quote is quoted (RFC 4180); absent cells are empty."""
    from kloudmeter_py.core.export import openmeter_csv
    from kloudmeter_py.core.query import QueryRow

    t0, t1 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    rows = [
        QueryRow(value=2.5, windowStart=t0, windowEnd=t1, subject=None, groupBy={"g": 'a,"b"'}),
        QueryRow(value=1, windowStart=t0, windowEnd=t1, subject=None, groupBy={"g": None}),
    ]
    assert openmeter_csv(rows, ["g"]).decode() == (
        "window_start,window_end,subject,g,value\r\n"
        "2026-01-01T00:00:00Z,2026-01-02T00:00:00Z,,,1\r\n"
        '2026-01-01T00:00:00Z,2026-01-02T00:00:00Z,,"a,""b""",2.5\r\n'
    )
