"""JSON Schema pieces for the OpenAPI operations declared next to the handlers (bodies are
msgspec models; these are for parameters and the rules across fields a model cannot say)."""

import re
from typing import Any

Schema = dict[str, Any]

# A JSONPath the server always accepts: a plain key chain (core.paths' fast path). Other
# jsonpath-ng expressions are accepted too, when they compile.
PLAIN_PATH = r"^\$(\.[A-Za-z_][A-Za-z0-9_]*)+$"


def any_case(*words: str) -> str:
    """A pattern matching any of ``words`` in any case (JSON Schema has no flags)."""
    alternatives = (
        "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)
        for word in words
    )
    return "^(" + "|".join(alternatives) + ")$"


def meter_rules(*, lifecycle_fields: bool) -> Schema:
    """What validate_meter checks across fields: a value path unless counting (or
    following lifecycles), and the lifecycle fields only for ``duration``."""
    no_value = {"properties": {"aggregation": {"pattern": any_case("count", "duration")}}}
    value = {"required": ["valueProperty"], "properties": {"valueProperty": {"type": "string"}}}
    rules: list[Schema] = [{"anyOf": [no_value, value]}]
    if lifecycle_fields:
        duration = {"properties": {"aggregation": {"pattern": any_case("duration")}}}
        fields = ("resourceProperty", "actionProperty", "actions")
        none = {"not": {"anyOf": [{"required": [f]} for f in fields]}}
        rules.append({"anyOf": [duration, none]})
    return {"allOf": rules}


# An event time in the years 0002..9998 (core.models.check_event_time), with a UTC offset.
EVENT_YEAR = r"^(000[2-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9])-"


# An RFC 3339 time msgspec reads (a subset: days 01-28, offsets on the hour), for schemas of
# time fields whose "format" a generator does not honour.
RFC3339 = (
    r"^(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]0[0-9]:00)$"
)


def with_pattern(schema: Schema, pattern: str) -> Schema:
    """``schema`` (a string, or anyOf with a string) with ``pattern`` on its string."""
    if "anyOf" in schema:
        return {**schema, "anyOf": [with_pattern(s, pattern) for s in schema["anyOf"]]}
    return {**schema, "pattern": pattern} if schema.get("type") == "string" else schema


# What store.auth.check_tenant accepts.
TENANT_PATTERN = "^[A-Za-z0-9_-]{1,128}$"
TENANT: Schema = {"type": "string", "pattern": TENANT_PATTERN}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


STR: Schema = {"type": "string"}
NUM: Schema = {"type": "number"}
TIME: Schema = {"type": "string", "format": "date-time"}
OBJ: Schema = {"type": "object"}
