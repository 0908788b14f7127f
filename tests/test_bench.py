"""`kloudmeter bench` keeps working: a small run gives every figure and correct readings."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kloudmeter_py import bench
from kloudmeter_py.store.server import NatsServer
from kloudmeter_py.worker import memtrace
from tests.helpers import small_wide_bench

KEYS = {
    "baseline_events_per_s",
    "e2e_events_per_s",
    "e2e_settle_ms",
    "e2e_ratio",
    "http_single_events_per_s",
    "http_batch_events_per_s",
    "lag_p50_ms",
    "lag_p99_ms",
    "worker_peak_rss_mb",
    "correct",
    "distinct_keys",
    "kv_writes_per_event",
    "worker_cpu_s",
    "nats_server_cpu_s",
    "disk_bytes_per_event",
    "http_single_ratio",
    "http_batch_ratio",
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


async def test_small_wide_bench_checks_every_reading_and_window() -> None:
    """The wide shape, small (embedded NATS, so that disk and server CPU are known): times
    over 30 days make mostly day windows, and every one of them is checked."""
    results = await small_wide_bench()
    assert KEYS <= set(results) and results["shape"] == "wide"
    assert results["correct"] is True, results.get("wrong")
    # 2,000 events over 30 days of 300 subjects: nearly every event has day windows of its
    # own (3 meters), besides 300 x 7 readings; the windows are held in far fewer pages (a
    # month's days in one key per series).
    assert results["distinct_windows"] > 5000
    assert results["distinct_keys"] < results["distinct_windows"] * 0.8
    # every key written at least once (but a window at its retention edge, counted in
    # distinct_keys and maybe no longer written)
    assert results["kv_writes_per_event"] * 2000 >= results["distinct_keys"] * 0.95
    assert results["disk_bytes_per_event"] > 0 and results["nats_server_cpu_s"] > 0


async def test_small_wide_bench_with_two_workers_is_correct(tmp_path: Path) -> None:
    """Two worker processes share the four partitions (two each, a consumer per partition,
    see Runner._config): every reading and window is right, and each worker's figures are
    reported, with --memory-trace each one's trace line at its peak (worker.memtrace)."""
    results = await small_wide_bench(workers=2, memory_trace=str(tmp_path))
    assert results["correct"] is True, results.get("wrong")
    assert results["workers"] == 2 and len(results["workers_peak_rss_mb"]) == 2
    assert results["worker_peak_rss_mb"] == max(results["workers_peak_rss_mb"])
    assert "2 workers" in bench.table(results)
    traces = _trace_lines(results["memory_trace_dir"])
    assert len(traces) == 2
    # each worker's line at its peak is a line of its trace with none above it before it
    # (the workers go on tracing after the bench reads them), highest worker first; every
    # worker applied events and held keys while it was traced
    peaks = results["workers_peak_at"]
    assert peaks[0]["rss_mb"] >= peaks[1]["rss_mb"] > 0
    for lines in traces:
        at = next(at for at in peaks if at in lines)
        assert max(line["rss_mb"] for line in lines[: lines.index(at) + 1]) == at["rss_mb"]
        assert at["hwm_mb"] >= at["rss_mb"]
    for lines in traces:
        assert lines[-1]["events"] > 0
        assert max(line["pages"] + line["readings"] + line["states"] for line in lines) > 0
        # and which allocator held it (glibc's figures are 0 where there is no mallinfo2)
        assert all(line["py_blocks_k"] > 0 for line in lines)
        assert all(0 <= line["heap_used_mb"] <= line["heap_mb"] for line in lines)
        assert max(line["heap_mb"] for line in lines) > 0 or memtrace.heap_mb()["heap_mb"] == 0
    assert "a worker at its peak (trace)" in bench.table(results)


def _trace_lines(trace_dir: str) -> list[list[dict[str, Any]]]:
    """The lines of each memory trace file in ``trace_dir`` (a line cut short at the end
    left out)."""
    traces = []
    for path in sorted(Path(trace_dir).glob("memory-*.jsonl")):
        lines = []
        for raw in path.read_bytes().splitlines():
            try:
                lines.append(msgspec.json.decode(raw))
            except msgspec.DecodeError:
                pass
        traces.append(lines)
    return traces


def test_a_memory_trace_peak_is_its_highest_resident_line(tmp_path: Path) -> None:
    """The bench reports the line with the most resident memory, the first of equals, and
    skips a line cut short by the worker's end."""
    from kloudmeter_py.worker.memtrace import peak_line

    path = tmp_path / "memory-w.jsonl"
    path.write_bytes(
        b'{"t_s": 0.1, "rss_mb": 50.0}\n{"t_s": 0.2, "rss_mb": 91.5}\n'
        b'{"t_s": 0.3, "rss_mb": 91.5}\n{"t_s": 0.4, "rss_mb": 70.0}\n{"t_s": 0.5, "rss'
    )
    assert peak_line(path) == {"t_s": 0.2, "rss_mb": 91.5}
    assert peak_line(tmp_path / "none.jsonl") is None


def test_a_memory_trace_directory_that_cannot_be_written_names_the_setting(
    tmp_path: Path,
) -> None:
    """METER_MEMORY_TRACE under a file: the start stops with the setting's name."""
    from kloudmeter_py.errors import ConfigError
    from kloudmeter_py.worker.memtrace import open_trace

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="METER_MEMORY_TRACE"):
        open_trace(str(blocker / "traces"), "w1")
    with open_trace(str(tmp_path / "traces"), "w1") as out:
        out.write(b"{}\n")
    assert (tmp_path / "traces" / "memory-w1.jsonl").read_bytes() == b"{}\n"


def test_expected_totals_see_a_wrong_window() -> None:
    """The bench's check is not vacuous: one window off by one is reported."""
    from kloudmeter_py.config import Settings

    shape = bench.SHAPES["wide"]
    events = bench.make_events(200, 20, shape=shape)
    expected = bench.Expected(Settings())
    expected.add(events)
    readings = {k: (len(v) if isinstance(v, set) else v) for k, v in expected.readings.items()}
    windows = {k: (len(v) if isinstance(v, set) else v) for k, v in expected.windows.items()}
    assert expected.compare(readings, windows) == (True, [])
    key = next(k for k in windows if k[1] == "calls")
    windows[key] += 1
    ok, wrong = expected.compare(readings, windows)
    assert not ok and wrong and "window" in wrong[0]


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
