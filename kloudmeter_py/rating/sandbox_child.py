"""One rating-template evaluation, in a process of its own (see ``sandbox.py``).

Run as ``python -I sandbox_child.py MEMORY_MB CPU_SECONDS TIMEOUT``: it limits itself first
(address space, CPU time, no core dumps, no files written), then reads one JSON request on
stdin, ``{"op": "check" | "rate", "source": ..., "data": {...}}``, and writes one JSON answer
on stdout: ``{"ok": true, "type": "int" | "float" | "str" | "decimal", "value": "<text>"}`` or
``{"ok": false, "error": "invalid" | "failed" | "timeout" | "memory", "message": ...}``.

It imports nothing but the standard library and ``starlark`` (no kloudmeter_py), so a template
can reach nothing of the service even if it broke out of the interpreter. Starlark itself has
no I/O: no ``load()`` (refused here), no ``print``, no ``open``, no imports. Anything the
interpreter cannot survive (a native stack overflow, an allocation over the limit: Rust aborts)
ends only this process; the parent reads its exit status.
"""

import json
import resource
import sys
import time
from decimal import Decimal
from typing import Any

MAX_RESULT_CHARS = 200
MAX_CALL_DEPTH = 200
# The line that binds the friendlier name for the exact-decimal type, evaluated before the
# template in the same module (``decimal("0.01")``; ``RustDecimal`` is the library's name).
PRELUDE = "decimal = RustDecimal\n"
# Appended to the template only for the static arity check: calls rate with one argument.
PROBE = "\n\ndef __kloudmeter_probe__():\n    return rate({})\n"


def limit(memory_mb: int, cpu_seconds: int) -> None:
    memory = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # SIGXCPU at the soft limit, SIGKILL one second later: a backstop for a parent that died.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def answer(body: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(body))
    sys.stdout.flush()


def fail(kind: str, message: str) -> None:
    answer({"ok": False, "error": kind, "message": message[:4000]})


def describe(exc: BaseException) -> str:
    """The error lines of a Starlark traceback, without the frames."""
    text = str(exc).strip()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("error:"):
            return "\n".join(lines[i:]).strip()
    return text


def result(value: object) -> dict[str, Any] | None:
    """The answer for what rate() returned, or None (after fail()) when it is no number."""
    # bool first: it is an int in Python
    if isinstance(value, bool) or value is None:
        fail("failed", f"rate() returned {value!r}; it must return a number or a numeric string")
        return None
    if isinstance(value, int):
        try:
            text = str(value)
        except ValueError:
            text = "x" * (MAX_RESULT_CHARS + 1)
        kind = "int"
    elif isinstance(value, float):
        text, kind = repr(value), "float"
    elif isinstance(value, Decimal):
        text, kind = str(value), "decimal"
    elif isinstance(value, str):
        text, kind = value, "str"
    else:
        fail("failed", f"rate() returned a {type(value).__name__}; it must return a number")
        return None
    if len(text) > MAX_RESULT_CHARS:
        fail("failed", f"rate() returned a value longer than {MAX_RESULT_CHARS} characters")
        return None
    return {"ok": True, "type": kind, "value": text}


def main() -> int:
    memory_mb, cpu_seconds, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    limit(memory_mb, cpu_seconds)
    try:
        import starlark as sl
    except MemoryError:
        fail("memory", f"the sandbox cannot start within {memory_mb} MiB")
        return 0
    request = json.loads(sys.stdin.buffer.read())
    op, source = request["op"], request["source"]
    deadline = time.monotonic() + timeout
    options = sl.EvalOptions(
        check_cancelled=lambda: time.monotonic() > deadline, max_callstack_size=MAX_CALL_DEPTH
    )
    dialect = sl.Dialect.standard()
    globals_ = sl.Globals.extended_by([sl.LibraryExtension.RustDecimal])
    bad_code = "invalid" if op == "check" else "failed"
    try:
        ast = sl.parse("template.star", source, dialect)
    except sl.StarlarkError as exc:
        fail(bad_code, describe(exc))
        return 0
    if ast.loads():
        names = ", ".join(repr(load.module_id) for load in ast.loads())
        fail(bad_code, f"load() is not available in rating templates (tried {names})")
        return 0
    module = sl.Module()
    try:
        sl.eval(module, sl.parse("prelude.star", PRELUDE, dialect), globals_)
        sl.eval_with(options, module, ast, globals_)
        kind = sl.eval(module, sl.parse("probe.star", "type(rate)", dialect), globals_)
    except sl.StarlarkError as exc:
        message = describe(exc)
        if "Variable `rate` not found" in message:
            fail(bad_code, "the template must define a top-level function rate(data)")
        elif "cancelled" in message:
            fail("timeout", f"the template's top level ran longer than {timeout:g} s")
        else:
            fail(bad_code, message)
        return 0
    if kind != "function":
        fail(bad_code, f"rate must be a function rate(data), not a {kind}")
        return 0
    if op == "check":
        probe = sl.parse("template.star", source + PROBE, dialect)
        errors, _, _ = probe.typecheck(globals_, {})
        first_probe_line = source.count("\n") + 1
        for error in errors:
            span = error.span
            if span is not None and span.span.begin.line >= first_probe_line:
                text = describe(Exception(str(error))).splitlines()[0].removeprefix("error: ")
                fail(bad_code, f"rate must take one argument, rate(data): {text}")
                return 0
        answer({"ok": True, "type": "none", "value": ""})
        return 0
    try:
        value = module.freeze().call_with(options, "rate", request["data"]).value
    except sl.StarlarkError as exc:
        message = describe(exc)
        if "Evaluation cancelled" in message:
            fail("timeout", f"rate() ran longer than {timeout:g} s")
        else:
            fail("failed", message)
        return 0
    body = result(value)
    if body is not None:
        answer(body)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MemoryError:
        # Python-side allocations over RLIMIT_AS; the interpreter's own end in an abort instead
        fail("memory", "the template used more memory than allowed")
        sys.exit(0)
