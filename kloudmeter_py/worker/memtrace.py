"""A worker's memory over time, line by line, to find what sets its peak (METER_MEMORY_TRACE).

Every ``INTERVAL_S`` the worker appends one JSON object to ``memory-<worker id>.jsonl`` in the
directory the setting names: seconds since it started, its resident memory now and at its
peak so far (``/proc/self/status``; 0 where there is none), the events it has applied, what
its key cache holds (see worker.keystore): key states, parked pages and packed readings,
counted and in estimated MB, and which allocator holds its memory: the blocks Python's
small-object allocator has in use (``py_blocks_k``, thousands; objects of up to 512 bytes,
in arenas it keeps once they are filled) and glibc's heap (``heap_mb``, what it has from the
system; ``heap_used_mb``, in use; ``mmap_mb``, large blocks mapped apart; 0 without glibc's
``mallinfo2``).

Why: a worker's peak RSS is a maximum over a whole run, and what sets it moves between
phases. On the wide bench shape at 10,000 subjects (b387853, two workers) the peaks came at
70-81 s, near the end of a worker's backlog, and RSS less the cache's estimate was then
80.1-86.0 MB, against 75.2-75.9 MB at 1,000 subjects with about as much in the cache
(README, Performance). The allocators' figures tell which holds what: at 10,000 subjects
(74d2fc1) Python's blocks in use peaked at ~548,000 in a worker's first ~9 s, with ~28,000
pages and ~20,000 readings held and ~15 MB of glibc's heap in use; the peak RSS came ~65 s
later, with ~450,000-480,000 blocks and ~28 MB of the heap in use. ``kloudmeter bench
--memory-trace DIR`` turns it on for the bench's workers and reports, for each, the line at
its peak (``workers_peak_at``).

Cost: a sample reads one small /proc file, asks both allocators for their totals (~9 us)
and writes ~250 bytes (tens of microseconds, ten times a second); it is taken between the
worker's other steps, so a step that holds the event loop delays it. A sample is not the
peak: the bench's ``worker_peak_rss_mb`` is the kernel's high-water mark (VmHWM), read once
after the run. The two differ by a little either way (a trace once held a sample 0.2 MB
above the VmHWM read later).
"""

import asyncio
import ctypes
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import msgspec

from kloudmeter_py.errors import ConfigError
from kloudmeter_py.worker.keystore import libc_function

if TYPE_CHECKING:
    from kloudmeter_py.worker import Worker

INTERVAL_S = 0.1
_MB = 1 << 20


def proc_memory_mb(pid: int | None = None) -> tuple[float, float]:
    """(resident, peak resident) memory in MB of process ``pid`` (None: this one), from
    Linux's /proc (VmRSS, VmHWM); (0, 0) where unknown."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid or 'self'}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return round(rss / 1024, 1), round(hwm / 1024, 1)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # bytes of the heap from the system (brk), in-use and free
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",  # bytes in blocks mapped apart (mmap)
            "usmblks",
            "fsmblks",
            "uordblks",  # bytes in use in the heap
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo2() -> Callable[[], _Mallinfo2] | None:
    call = libc_function("mallinfo2")  # glibc 2.33+
    if call is None:
        return None
    call.restype = _Mallinfo2
    found: Callable[[], _Mallinfo2] = call
    return found


_MALLINFO2 = _mallinfo2()


def heap_mb() -> dict[str, float]:
    """glibc's heap: from the system, in use, and mapped apart, in MB (0 without glibc)."""
    if _MALLINFO2 is None:
        return {"heap_mb": 0.0, "heap_used_mb": 0.0, "mmap_mb": 0.0}
    info = _MALLINFO2()
    return {
        "heap_mb": round(info.arena / _MB, 1),
        "heap_used_mb": round(info.uordblks / _MB, 1),
        "mmap_mb": round(info.hblkhd / _MB, 1),
    }


def open_trace(directory: str, worker_id: str) -> IO[bytes]:
    """The file a worker appends its memory lines to; ConfigError naming the setting when
    the directory cannot be made or written."""
    path = Path(directory) / f"memory-{worker_id}.jsonl"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "ab")  # held open while the worker runs
    except OSError as exc:
        raise ConfigError(f"METER_MEMORY_TRACE: cannot write {path}: {exc.strerror}") from exc


def sample(worker: "Worker", started: float) -> dict[str, Any]:
    """One line of the trace: the process's memory and what the worker's key cache holds."""
    rss, hwm = proc_memory_mb()
    line: dict[str, Any] = {
        "t_s": round(time.monotonic() - started, 2),
        "rss_mb": rss,
        "hwm_mb": hwm,
        "events": worker.stats.events,
        "states": 0,
        "pages": 0,
        "readings": 0,
        "cache_mb": 0.0,
        "parked_mb": 0.0,
    }
    line["py_blocks_k"] = sys.getallocatedblocks() // 1000
    line.update(heap_mb())
    runner = worker.runner
    if runner is not None:
        keys = runner.keys
        line["states"] = len(keys.cache)
        line["pages"] = sum(len(pages) for pages in keys.pages.values())
        line["readings"] = len(keys.readings)
        line["cache_mb"] = round(keys.cache_bytes / _MB, 2)
        line["parked_mb"] = round(keys.parked_bytes / _MB, 2)
    return line


async def trace(worker: "Worker", out: IO[bytes]) -> None:
    """Append a line every INTERVAL_S until cancelled; the file is closed then."""
    started = time.monotonic()
    encoder = msgspec.json.Encoder()
    try:
        while True:
            out.write(encoder.encode(sample(worker, started)) + b"\n")
            out.flush()
            await asyncio.sleep(INTERVAL_S)
    finally:
        out.close()


def peak_line(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The line of a trace file with the highest resident memory (the first such), or None
    for an empty or missing file."""
    best: dict[str, Any] | None = None
    try:
        with open(path, "rb") as lines:
            for raw in lines:
                try:
                    line = msgspec.json.decode(raw)
                except msgspec.DecodeError:
                    continue  # a line cut short by the worker's end
                if isinstance(line, dict) and (
                    best is None or line.get("rss_mb", 0) > best.get("rss_mb", 0)
                ):
                    best = line
    except OSError:
        return None
    return best
