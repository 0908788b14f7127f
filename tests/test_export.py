"""GET /api/meters/{id}/export: its rows and CSV shaped from tables (no server), then against a
real server: CSV and JSON equal totals computed from the events sent, a user sees its own
tenant only (another tenant's token answers as an unknown tenant's), bad parameters are 400s
naming the field."""

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client

from kloudmeter_py.config import Settings
from kloudmeter_py.core.export import cell, columns, csv_chunks, json_chunks, ordered
from kloudmeter_py.gateway import create_app
from kloudmeter_py.gateway.query import QueryRow
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.worker import Worker
from tests.helpers import Http
from tests.months import SUBJECTS, expected_months, iso, meters_with_events, month_start, utc

ADMIN = "admin-token-for-export-0123456789"
JAN = datetime(2026, 1, 1, tzinfo=UTC)
FEB = datetime(2026, 2, 1, tzinfo=UTC)
MAR = datetime(2026, 3, 1, tzinfo=UTC)


def _row(
    subject: str | None, groups: dict[str, str | None], start: datetime, value: Any
) -> QueryRow:
    end = FEB if start == JAN else MAR
    return QueryRow(value=value, windowStart=start, windowEnd=end, subject=subject, groupBy=groups)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, ""),
        (0, "0"),
        (12, "12"),
        (12.5, "12.5"),
        (26 / 6, "4.333333333333333"),
        (1e16, "1e16"),
        (JAN, "2026-01-01T00:00:00Z"),
        (datetime(2026, 1, 1, 1, tzinfo=ZoneInfo("Europe/Berlin")), "2026-01-01T00:00:00Z"),
        ("a,b", "a,b"),  # csv quotes it, not cell
    ],
)
def test_cells_spell_values_as_the_json_answer_does(value: object, text: str) -> None:
    """Numbers as JSON writes them, times in UTC with a Z, none as an empty cell."""
    assert cell(value) == text


@pytest.mark.parametrize(
    ("group_by", "header"),
    [
        ([], ["subject", "windowStart", "windowEnd", "value"]),
        (
            ["region", "value"],
            ["subject", "groupBy.region", "groupBy.value", "windowStart", "windowEnd", "value"],
        ),
    ],
)
def test_group_columns_never_clash_with_the_fixed_ones(
    group_by: list[str], header: list[str]
) -> None:
    """A group named value (or subject) gets its own column."""
    assert columns(group_by) == header


def test_rows_are_ordered_by_subject_then_group_then_window() -> None:
    """One customer's usage together; a missing group value sorts first."""
    rows = [
        _row("b", {"r": "eu"}, JAN, 1),
        _row("a", {"r": "us"}, FEB, 2),
        _row("a", {"r": "us"}, JAN, 3),
        _row("a", {"r": None}, FEB, 4),
        _row("a", {"r": "eu"}, FEB, 5),
    ]
    assert [r.value for r in ordered(rows, ["r"])] == [4, 5, 3, 2, 1]


@pytest.mark.parametrize(
    ("subjects", "expected"),
    [
        (["b", "a", "a"], [("a", JAN), ("a", FEB), ("b", FEB)]),
        ([None, "a", None], [(None, JAN), (None, FEB), ("a", FEB)]),  # none first
        ([None, None, None], [(None, JAN), (None, FEB), (None, FEB)]),
        (["", None, "a"], [(None, FEB), ("", FEB), ("a", JAN)]),
    ],
)
def test_rows_split_by_no_group_are_ordered_by_subject_then_window(
    subjects: list[str | None], expected: list[tuple[str | None, datetime]]
) -> None:
    """Without groups the same order (a missing subject first, before an empty one)."""
    starts = [FEB, FEB, JAN]
    rows = [_row(s, {}, start, 1) for s, start in zip(subjects, starts, strict=True)]
    assert [(r.subject, r.windowStart) for r in ordered(rows, [])] == expected


CSV_TABLE = [
    (
        [],
        [_row("acme", {}, JAN, 3)],
        "subject,windowStart,windowEnd,value\r\n"
        "acme,2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,3\r\n",
    ),
    (
        ["region"],
        [_row('a, "quoted"\nco', {"region": None}, FEB, 1.5)],
        "subject,groupBy.region,windowStart,windowEnd,value\r\n"
        '"a, ""quoted""\nco",,2026-02-01T00:00:00Z,2026-03-01T00:00:00Z,1.5\r\n',
    ),
    ([], [], "subject,windowStart,windowEnd,value\r\n"),
    (
        [],
        [
            _row('a, "q"', {}, JAN, 1e16),
            _row(None, {}, FEB, None),
            _row("b\r\nc", {}, JAN, True),
            _row("d", {}, JAN, 2.5),
        ],
        "subject,windowStart,windowEnd,value\r\n"
        '"a, ""q""",2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,1e16\r\n'
        ",2026-02-01T00:00:00Z,2026-03-01T00:00:00Z,\r\n"
        '"b\r\nc",2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,true\r\n'
        "d,2026-01-01T00:00:00Z,2026-02-01T00:00:00Z,2.5\r\n",
    ),
]


@pytest.mark.parametrize(("group_by", "rows", "text"), CSV_TABLE)
def test_csv_is_rfc_4180(group_by: list[str], rows: list[QueryRow], text: str) -> None:
    """A header, CRLF lines, cells with commas, quotes or line breaks quoted."""
    assert b"".join(csv_chunks(rows, group_by)).decode() == text


@pytest.mark.parametrize("per_chunk", [1, 2, 3, 1000])
def test_chunks_join_to_the_same_answer_however_they_are_cut(per_chunk: int) -> None:
    """CSV and JSON pieces join to one document, the same at every chunk size; the JSON
    one decodes to the query answer's shape."""
    rows = [_row(s, {"r": "eu"}, JAN, i) for i, s in enumerate(["a", "b", "c", "d", "e"])]
    head = {"from": JAN, "to": FEB, "windowSize": "MONTH", "windowTimeZone": "UTC"}
    whole_csv = b"".join(csv_chunks(rows, ["r"], per_chunk=1000))
    assert b"".join(csv_chunks(rows, ["r"], per_chunk=per_chunk)) == whole_csv
    assert len(whole_csv.splitlines()) == 6
    doc = msgspec.json.decode(b"".join(json_chunks(head, rows, per_chunk=per_chunk)))
    assert doc["windowSize"] == "MONTH" and doc["from"] == "2026-01-01T00:00:00Z"
    assert [(r["subject"], r["value"], r["groupBy"]) for r in doc["data"]] == [
        (s, i, {"r": "eu"}) for i, s in enumerate(["a", "b", "c", "d", "e"])
    ]
    empty = msgspec.json.decode(b"".join(json_chunks(head, [], per_chunk=per_chunk)))
    assert empty["data"] == []


# -- against a real server ------------------------------------------------------------------


@pytest.fixture
def settings(nats_server: NatsServer) -> Settings:
    return Settings(
        nats_url=nats_server.url,
        partitions=2,
        hour_retention=400 * 86400,
        summary_flush_ms=0,
        admin_token=ADMIN,
    )


@pytest.fixture
async def http(nc: Client, settings: Settings) -> AsyncIterator[Http]:
    async with TestClient(TestServer(create_app(settings, nc))) as client:
        yield client


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _token(http: Http, tenant: str) -> str:
    resp = await http.post("/api/users", json={"tenant": tenant}, headers=_h(ADMIN))
    assert resp.status == 201, await resp.text()
    token: str = (await resp.json())["token"]
    return token


async def _export(http: Http, token: str, meter: str, **params: str) -> tuple[str, str]:
    resp = await http.get(f"/api/meters/{meter}/export", params=params, headers=_h(token))
    text = await resp.text()
    assert resp.status == 200, text
    return resp.content_type, text


def _csv_months(text: str, tz: ZoneInfo, group: str | None) -> dict[tuple[Any, ...], float]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    out = {}
    for r in reader:
        local = utc(r["windowStart"]).astimezone(tz)
        key = (local.year, local.month, r["subject"], r[f"groupBy.{group}"] if group else None)
        assert key not in out
        out[key] = float(r["value"])
    return out


def _json_months(text: str, tz: ZoneInfo, group: str | None) -> dict[tuple[Any, ...], float]:
    out = {}
    for r in msgspec.json.decode(text)["data"]:
        local = utc(r["windowStart"]).astimezone(tz)
        key = (local.year, local.month, r["subject"], r["groupBy"][group] if group else None)
        assert key not in out
        out[key] = r["value"]
    return out


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin"])
async def test_export_equals_totals_from_the_events(http: Http, worker: Worker, zone: str) -> None:
    """MONTH per subject and region, and one total per subject for the period, as CSV and as
    JSON: each value equals what the events sent add up to; an admin sees every subject."""
    now = datetime.now(UTC)
    events = await meters_with_events(http, now, **_h(ADMIN))
    tz = ZoneInfo(zone)
    start, end = iso(month_start(now, tz, 5)), iso(month_start(now, tz))
    in_span = [e for e in events if start <= e["time"] < end]
    span = {"from": start, "to": end, "windowTimeZone": zone}
    monthly = {**span, "windowSize": "MONTH", "groupBy": "region"}
    by_month = expected_months(in_span, tz, by_subject=True, by_region=True)
    assert {key[2] for key in by_month} == set(SUBJECTS)
    for meter, pick in (("usage", 0), ("calls", 1)):
        want = {k: v[pick] for k, v in by_month.items()}
        media, text = await _export(http, ADMIN, meter, **monthly, format="csv")
        assert media == "text/csv"
        assert text.startswith("subject,groupBy.region,windowStart,windowEnd,value\r\n")
        assert _csv_months(text, tz, "region") == want
        media, text = await _export(http, ADMIN, meter, **monthly, format="json")
        assert media == "application/json"
        assert _json_months(text, tz, "region") == want
    # No windowSize: one row per subject for the whole period.
    media, text = await _export(http, ADMIN, "usage", **span, format="csv")
    totals: dict[str, int] = {}
    for e in in_span:
        totals[e["subject"]] = totals.get(e["subject"], 0) + e["data"]["v"]
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [(r["subject"], float(r["value"])) for r in rows] == sorted(totals.items())
    assert {(r["windowStart"], r["windowEnd"]) for r in rows} == {(start, end)}


async def test_a_user_exports_its_own_tenant_and_another_tenant_answers_as_none(
    http: Http, worker: Worker
) -> None:
    """A user's export has its own subject's rows only; the same export with another
    tenant's token is exactly the answer of a tenant that has no data at all."""
    now = datetime.now(UTC)
    events = await meters_with_events(http, now, **_h(ADMIN))
    acme = await _token(http, "acme")
    other = await _token(http, "zz-other")
    unknown = await _token(http, "zz-never-seen")
    start, end = iso(month_start(now, ZoneInfo("UTC"), 5)), iso(month_start(now, ZoneInfo("UTC")))
    span = {"from": start, "to": end, "windowSize": "MONTH", "groupBy": "region"}
    tz = ZoneInfo("UTC")
    acme_events = [e for e in events if e["subject"] == "acme" and start <= e["time"] < end]
    want = {k: v[0] for k, v in expected_months(acme_events, tz, True, True).items()}
    for fmt in ("csv", "json"):
        _, own = await _export(http, acme, "usage", **span, format=fmt)
        got = _csv_months(own, tz, "region") if fmt == "csv" else _json_months(own, tz, "region")
        assert got == want and want
        _, theirs = await _export(http, other, "usage", **span, format=fmt)
        _, nobody = await _export(http, unknown, "usage", **span, format=fmt)
        assert theirs == nobody
        assert "acme" not in theirs and "globex" not in theirs
    # A tenant's export of a meter that does not exist: 404, as for anyone.
    resp = await http.get(
        "/api/meters/nope/export", params={**span, "format": "csv"}, headers=_h(acme)
    )
    assert resp.status == 404


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"to": "2026-02-01T00:00:00Z", "format": "csv"}, "from"),
        ({"from": "2026-01-01T00:00:00Z", "format": "csv"}, "to"),
        ({"from": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z"}, "format"),
        ({"from": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z", "format": "xml"}, "format"),
        ({"from": "January", "to": "2026-02-01T00:00:00Z", "format": "csv"}, "from"),
        ({"from": "2026-03-01T00:00:00Z", "to": "2026-02-01T00:00:00Z", "format": "csv"}, "from"),
        (
            {
                "from": "2026-01-01T00:00:00Z",
                "to": "2026-02-01T00:00:00Z",
                "format": "json",
                "windowSize": "WEEK",
            },
            "windowSize",
        ),
        (
            {
                "from": "2026-01-01T00:00:00Z",
                "to": "2026-02-01T00:00:00Z",
                "format": "csv",
                "windowTimeZone": "Mars/Olympus",
            },
            "windowTimeZone",
        ),
        (
            {
                "from": "2026-01-01T00:00:00Z",
                "to": "2026-02-01T00:00:00Z",
                "format": "csv",
                "groupBy": "colour",
            },
            "groupBy",
        ),
    ],
)
async def test_bad_export_parameters_are_400s_naming_the_field(
    http: Http, params: dict[str, str], field: str
) -> None:
    """Each missing or invalid parameter answers 400 naming it, before any row is sent."""
    resp = await http.post(
        "/api/create-meter",
        json={"id": "m", "eventType": "t", "aggregation": "count", "groupBy": {"r": "$.r"}},
        headers=_h(ADMIN),
    )
    assert resp.status == 201, await resp.text()
    resp = await http.get("/api/meters/m/export", params=params, headers=_h(ADMIN))
    body = await resp.json()
    assert resp.status == 400, body
    assert body["field"] == field, body
    assert field in body["message"]
