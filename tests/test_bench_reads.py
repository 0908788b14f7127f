"""`kloudmeter bench --reads` times real answers: every read's rows are checked, and a wrong or
failed answer is reported instead of timed."""

import json
from decimal import Decimal
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kloudmeter_py import bench_reads

READS = (
    "one_subject_day",
    "all_subjects_day",
    "sum_by_region_day",
    "last_day_hour_by_region",
    "openmeter_by_subject_day",
)
LIFECYCLE_READS = ("records_one_resource", "resources_one_tenant", "charging_one_tenant_month")
FIELDS = {
    "raw_fetch_ms",
    "raw_entries",
    "load_avg_1m",
    "subjects",
    "events",
    "reads_correct",
    "not_measured",
    "resources",
    "lifecycle_events",
    "lifecycle_fold_s",
}


async def test_reads_json_reports_every_read_with_its_expected_rows() -> None:
    """A tiny wide shape (embedded NATS, worker and gateway processes): each read answered
    with the rows computed from the events, and the raw fetch of as many entries; then the
    lifecycle reads of 50 resources, answered with the records, resources and charge computed
    from their events and the price."""
    # (run in-process: the CLI has no --resources, and its default is 10,000)
    results = await bench_reads.run(
        nats_url=None, events_n=2000, subjects=50, resources=50, quiet=True
    )
    r: dict[str, Any] = json.loads(json.dumps(results))  # what --json prints
    assert r["reads_correct"] is True
    assert FIELDS <= set(r) and (r["subjects"], r["events"], r["resources"]) == (50, 2000, 50)
    for name in READS + LIFECYCLE_READS:
        assert r[f"{name}_rows"] == r[f"{name}_expected_rows"] > 0, name
        # (money as strings: the same amount, perhaps with other trailing zeros)
        assert Decimal(str(r[f"{name}_total"])) == Decimal(str(r[f"{name}_expected_total"]))
        assert 0 < r[f"{name}_p50_ms"] <= r[f"{name}_p99_ms"], name
        assert name in r["labels"] and r["labels"][name] in bench_reads.table(r), name
    # vm-0: created, resized, powered off, deleted: three segments, two of them billed
    assert r["records_one_resource_rows"] == 3
    assert Decimal(r["records_one_resource_total"]) > 0
    # customer-0 has vm-0 (deleted: its cost is final) and, of 50 resources over 50
    # subjects, nothing else; charged over the span, which ends before the reads
    assert r["resources_one_tenant_rows"] == r["charging_one_tenant_month_rows"] == 1
    assert (
        Decimal(r["charging_one_tenant_month_total"])
        == Decimal(r["resources_one_tenant_total"])
        == Decimal(r["records_one_resource_total"])
    )
    assert r["lifecycle_events"] > 50
    # 2,000 events of 50 subjects over 31 days: most subject-days have one
    assert r["openmeter_by_subject_day_rows"] > 1000
    # as many entries as the biggest answer has rows, or all there are (a page holds a month
    # of a series' days: fewer entries than rows)
    want = min(r["openmeter_by_subject_day_rows"], r["summary_entries"])
    assert r["raw_entries"] == want and r["raw_fetch_ms"] > 0
    assert r["not_measured"] == []


async def test_a_wrong_answer_is_reported_not_timed() -> None:
    """A read whose answer has other rows than expected, or is an error, has no timing."""

    async def one_row(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"value": 3}]})

    async def refused(request: web.Request) -> web.Response:
        return web.json_response({"message": "no"}, status=400)

    app = web.Application()
    app.router.add_get("/q", one_row)
    app.router.add_get("/bad", refused)
    async with TestClient(TestServer(app)) as client:
        base = str(client.make_url(""))
        right = bench_reads.Read("r", "r", "/q", (), rows=1, total=3)
        timed = await bench_reads.time_read(client.session, base, right, 3)
        assert timed["rows"] == 1 and timed["p50_ms"] is not None and "error" not in timed
        for read in (
            bench_reads.Read("w", "w", "/q", (), rows=2, total=3),
            bench_reads.Read("t", "t", "/q", (), rows=1, total=4),
            bench_reads.Read("e", "e", "/bad", (), rows=1, total=3),
        ):
            wrong = await bench_reads.time_read(client.session, base, read, 3)
            assert wrong["p50_ms"] is None and wrong["error"], read.name


def test_lifecycle_expectations() -> None:
    """The expected records and cost: a segment from each point to the next, the running
    vCPU hours at the flat hourly price; a resource still there is billed up to the end."""
    points = [(0, "start", 2), (10, "change", 4), (30, "stop", None), (40, "end", None)]
    assert bench_reads.billed(points, 720) == (3, Decimal("5.00"))  # (2x10 + 4x20) x 0.05
    assert bench_reads.billed([(700, "start", 3)], 720) == (1, Decimal("3.00"))  # 3 x 20 h
    plan = bench_reads.plan_lifecycle(300, 100, day_from_ms=0)
    assert plan.resources == 300 and len(plan.events) > 300
    records, resources, charging = plan.reads
    assert records.path == "/v1/records/vm-0" and records.rows == 3
    assert resources.rows == charging.rows == 3  # vm-0, vm-100, vm-200
    assert 0 < records.total <= resources.total <= charging.total
    for _, body, _ in plan.events:
        event = json.loads(body)
        assert event["time"] < "1970-01-31T00:00:00Z" and event["eventType"] == "vm"


async def test_a_wrong_lifecycle_answer_is_reported_not_timed() -> None:
    """A POSTed read counted by its own function: right, wrong and unreadable answers."""

    async def charging(request: web.Request) -> web.Response:
        assert (await request.json())["tenant"] == "t"
        return web.json_response({"items": [{}, {}], "totals": {"EUR": "1.50"}})

    app = web.Application()
    app.router.add_post("/charging", charging)
    async with TestClient(TestServer(app)) as client:
        base = str(client.make_url(""))

        def read(rows: int, total: Decimal, path: str = "/charging") -> bench_reads.Read:
            return bench_reads.Read(
                "c",
                "c",
                path,
                (),
                rows,
                total,
                method="POST",
                body=b'{"tenant": "t"}',
                count=bench_reads._count_charging,
            )

        timed = await bench_reads.time_read(client.session, base, read(2, Decimal("1.5")), 3)
        assert timed["p50_ms"] is not None and timed["total"] == "1.50"
        for wrong in (read(2, Decimal("1.49")), read(1, Decimal("1.5"))):
            out = await bench_reads.time_read(client.session, base, wrong, 3)
            assert out["p50_ms"] is None and out["error"]
        # an answer of another shape (an object, not a list of resources)
        unreadable = bench_reads.Read(
            "r",
            "r",
            "/charging",
            (),
            2,
            Decimal(0),
            method="POST",
            body=b'{"tenant": "t"}',
            count=bench_reads._count_resources,
        )
        out = await bench_reads.time_read(client.session, base, unreadable, 1)
        assert out["p50_ms"] is None and "unexpected answer" in out["error"]
        get = bench_reads.Read("g", "g", "/charging", (), 2, Decimal("1.5"))
        out = await bench_reads.time_read(client.session, base, get, 1)
        assert out["p50_ms"] is None and "HTTP 405" in out["error"]
