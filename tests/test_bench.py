"""`kloudmeter bench` keeps working: a small run gives every figure and correct readings."""

import json
import os
import subprocess
import sys
from typing import Any

from kloudmeter_py import bench
from kloudmeter_py.store.server import NatsServer

KEYS = {
    "baseline_events_per_s",
    "e2e_events_per_s",
    "e2e_ratio",
    "http_single_events_per_s",
    "http_batch_events_per_s",
    "lag_p50_ms",
    "lag_p99_ms",
    "worker_peak_rss_mb",
    "correct",
}


async def test_small_bench_run_reports_every_figure(nats_server: NatsServer) -> None:
    """A run with a small N against a test server: all figures present, readings correct."""
    results: dict[str, Any] = await bench.run(
        nats_url=nats_server.url,
        events_n=3000,
        subjects=50,
        http_seconds=0.5,
        lag_rate=400,
        lag_seconds=0.5,
        quiet=True,
    )
    assert KEYS <= set(results)
    assert results["correct"] is True
    assert results["e2e_events_per_s"] > 0 and results["baseline_events_per_s"] > 0
    assert results["http_batch_events_per_s"] > 0 and results["worker_peak_rss_mb"] > 0
    assert "end to end / baseline" in bench.table(results)


def test_bench_json_is_the_last_line_of_stdout() -> None:
    """`kloudmeter bench --json` (embedded NATS) prints one JSON object as its last line."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kloudmeter_py",
            "--log-level",
            "warning",
            "bench",
            "--json",
            "--events",
            "1000",
            "--subjects",
            "20",
            "--http-seconds",
            "0.3",
            "--lag-rate",
            "200",
            "--lag-seconds",
            "0.3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "NATS_URL"},
    )
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(last) and last["correct"] is True
