"""`kloudmeter bench --reads` times real answers: every read's rows are checked, and a wrong or
failed answer is reported instead of timed."""

import json
import os
import subprocess
import sys
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
FIELDS = {
    "raw_fetch_ms",
    "raw_entries",
    "load_avg_1m",
    "subjects",
    "events",
    "reads_correct",
    "not_measured",
}


def test_reads_json_reports_every_read_with_its_expected_rows() -> None:
    """A tiny wide shape (embedded NATS, worker and gateway processes): each read answered
    with the rows computed from the events, and the raw fetch of as many entries."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kloudmeter_py",
            "--log-level",
            "warning",
            "bench",
            "--reads",
            "--json",
            "--subjects",
            "50",
            "--events",
            "2000",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env={k: v for k, v in os.environ.items() if k != "NATS_URL"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["reads_correct"] is True
    assert FIELDS <= set(r) and (r["subjects"], r["events"]) == (50, 2000)
    for name in READS:
        assert r[f"{name}_rows"] == r[f"{name}_expected_rows"] > 0, name
        assert 0 < r[f"{name}_p50_ms"] <= r[f"{name}_p99_ms"], name
    # 2,000 events of 50 subjects over 31 days: most subject-days have one
    assert r["openmeter_by_subject_day_rows"] > 1000
    # as many entries as the biggest answer has rows, or all there are (a page holds a month
    # of a series' days: fewer entries than rows)
    want = min(r["openmeter_by_subject_day_rows"], r["summary_entries"])
    assert r["raw_entries"] == want and r["raw_fetch_ms"] > 0
    assert "/v1/resources" in r["not_measured"]


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
