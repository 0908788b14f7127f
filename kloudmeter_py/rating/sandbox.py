"""Run a rating template in Starlark (starlark-pyo3), in a short-lived process of its own.

Why a process: Starlark has no I/O, imports or load() here, and EvalOptions cancels a long
evaluation, but an allocation past the memory budget aborts the interpreter, and a process is
the unit the kernel can bound (RLIMIT_AS, RLIMIT_CPU) and kill. A failing, looping or greedy
template therefore ends only its own process; the server reads a JSON answer, or the lack of
one, and reports a clear error.
"""

import asyncio
import json
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

_CHILD = str(Path(__file__).with_name("sandbox_child.py"))


class TemplateError(Exception):
    """kind: invalid (does not compile), failed, timeout or memory."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


async def _run(request: dict[str, Any], timeout: float, memory_mb: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        _CHILD,
        str(memory_mb),
        str(max(1, int(timeout) + 1)),
        str(timeout),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(timeout + 2):
            out, _ = await proc.communicate(json.dumps(request).encode())
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise TemplateError("timeout", f"the template ran longer than {timeout:g} s") from None
    try:
        answer: dict[str, Any] = json.loads(out)
    except ValueError:
        raise TemplateError(
            "memory", f"the template was stopped (over {memory_mb} MiB, or it crashed)"
        ) from None
    return answer


async def check_template(source: str, *, timeout: float = 2.0, memory_mb: int = 256) -> None:
    """Compile the template and check it defines rate(data); TemplateError('invalid') if not."""
    answer = await _run({"op": "check", "source": source}, timeout, memory_mb)
    if not answer.get("ok"):
        raise TemplateError(answer.get("error", "invalid"), answer.get("message", ""))


async def run_template(
    source: str, data: dict[str, Any], *, timeout: float = 2.0, memory_mb: int = 256
) -> Decimal:
    """rate(data) as an exact Decimal, or TemplateError."""
    answer = await _run({"op": "rate", "source": source, "data": data}, timeout, memory_mb)
    if not answer.get("ok"):
        raise TemplateError(answer.get("error", "failed"), answer.get("message", ""))
    try:
        value = Decimal(answer["value"])
    except (InvalidOperation, KeyError):
        raise TemplateError(
            "failed", f"rate() returned {answer.get('value')!r}, not a number"
        ) from None
    if not value.is_finite():
        raise TemplateError("failed", "rate() returned a value that is not finite")
    return value
