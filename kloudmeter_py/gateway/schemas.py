"""JSON Schema pieces for the OpenAPI operations declared next to the handlers, and the
response schemas that are not msgspec models yet."""

import re
from collections.abc import Mapping
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


# What store.auth.check_tenant accepts.
TENANT_PATTERN = "^[A-Za-z0-9_-]{1,128}$"
TENANT: Schema = {"type": "string", "pattern": TENANT_PATTERN}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
TIME: Schema = {"type": "string", "format": "date-time"}
OBJ: Schema = {"type": "object"}


def obj(required: Mapping[str, Schema], optional: Mapping[str, Schema] | None = None) -> Schema:
    props = {**required, **(optional or {})}
    return {"type": "object", "properties": props, "required": list(required)}


def hand_schemas() -> dict[str, Schema]:
    status_error: Schema = {"const": "error"}
    row = obj(
        {
            "value": nullable(NUM),
            "windowStart": TIME,
            "windowEnd": TIME,
            "subject": nullable(STR),
            "groupBy": {"type": "object", "additionalProperties": nullable(STR)},
        }
    )
    query_result = obj(
        {
            "from": TIME,
            "to": TIME,
            "windowSize": {"enum": ["MINUTE", "HOUR", "DAY", None]},
            "data": array(ref("QueryRow")),
        },
        {"windowTimeZone": STR},
    )
    perf_average = obj(
        {
            "start-sec": INT,
            "end-sec": INT,
            "interval-size-sec": INT,
            "num-samples": INT,
            "avg": NUM,
        }
    )
    perf_summary = obj(
        {
            "averages": array(perf_average),
            "start": INT,
            "end": INT,
            "timeslice-size-sec": INT,
            "average-count": INT,
        }
    )
    user_view = obj(
        {"id": STR, "name": STR, "tenant": STR, "role": {"enum": ["admin", "user"]}},
        {"createdAt": TIME},
    )
    decimal: Schema = {"type": "string", "format": "decimal"}
    money = nullable(decimal)
    return {
        "Error": {
            **obj({"status": status_error, "message": STR}, {"field": STR}),
            "description": "KloudMeter's error envelope; field names the offending input.",
        },
        "Problem": {
            **obj(
                {"type": STR, "title": STR, "status": INT, "detail": STR},
                {"instance": STR, "field": STR},
            ),
            "description": "RFC 9457 problem details (OpenMeter's errors).",
        },
        "TemplateError": obj({"status": {"const": "error"}, "kind": STR, "message": STR}),
        "Accepted": obj({"status": {"const": "ok"}}, {"duplicate": {"const": True}}),
        "Health": obj({"status": {"const": "ok"}}),
        "OpenMeterMeter": obj(
            {
                "id": STR,
                "slug": STR,
                "name": STR,
                "description": nullable(STR),
                "aggregation": STR,
                "eventType": STR,
                "valueProperty": nullable(STR),
                "groupBy": {"type": "object", "additionalProperties": STR},
                "createdAt": TIME,
                "updatedAt": TIME,
            }
        ),
        "OpenMeterQueryBody": {
            "type": "object",
            "properties": {
                "from": STR,
                "to": STR,
                "windowSize": STR,
                "windowTimeZone": STR,
                "subject": array(STR),
                "groupBy": array(STR),
                "filterGroupBy": {
                    "type": "object",
                    "additionalProperties": {
                        "anyOf": [STR, {**array(STR), "minItems": 1, "maxItems": 1}]
                    },
                },
            },
        },
        "QueryRow": row,
        "QueryResult": query_result,
        "DeadLetterCounts": obj(
            {"total": INT, "byMeter": {"type": "object", "additionalProperties": INT}}
        ),
        "PerfAccepted": obj({"status": {"const": "ok"}, "events": INT}, {"duplicates": INT}),
        "PerfSummary": perf_summary,
        "PerfHost": {"type": "object", "additionalProperties": ref("PerfSummary")},
        "Usage": obj(
            {
                "tenant": STR,
                "start": TIME,
                "end": TIME,
                "usage": array(obj({"location": STR, "hours": NUM})),
            }
        ),
        "UserView": user_view,
        "UserCreated": {
            **obj(
                {**user_view["properties"], "token": STR},
            ),
            "description": "The new user and its token, shown this once.",
        },
        "Resource": obj(
            {
                "meter": STR,
                "resource_id": STR,
                "status": {"enum": ["running", "stopped", "deleted"]},
                "quantity": decimal,
                "consumption": decimal,
            },
            {
                "resource_name": nullable(STR),
                "resource_type": nullable(STR),
                "region": nullable(STR),
                "tenant_id": nullable(STR),
                "created_at": nullable(TIME),
                "deleted_at": nullable(TIME),
                "currency": nullable(STR),
            },
        ),
        "Record": obj(
            {
                "meter": STR,
                "resource_id": STR,
                "start_at": TIME,
                "end_at": TIME,
                "status": {"enum": ["running", "stopped"]},
                "quantity": decimal,
                "consumption": decimal,
            },
            {
                "weight": {},
                "seconds": {},
                "unit_price": money,
                "price_id": nullable(STR),
                "currency": nullable(STR),
            },
        ),
        "Charging": obj(
            {
                "tenant": nullable(STR),
                "start": TIME,
                "end": TIME,
                "totals": {"type": "object", "additionalProperties": decimal},
                "items": array(
                    obj(
                        {"meter": STR, "resource_id": STR, "quantity": decimal, "cost": decimal},
                        {
                            "tenant": nullable(STR),
                            "unit_price": money,
                            "price_id": nullable(STR),
                            "currency": nullable(STR),
                            "metadata": OBJ,
                        },
                    )
                ),
            }
        ),
        "CostEstimate": obj(
            {
                "hours": decimal,
                "groups": array(
                    obj(
                        {
                            "name": STR,
                            "price_id": STR,
                            "currency": STR,
                            "min_quantity": decimal,
                            "max_quantity": decimal,
                            "min_cost": decimal,
                            "max_cost": decimal,
                        }
                    )
                ),
                "totals": {
                    "type": "object",
                    "additionalProperties": obj({"min_cost": decimal, "max_cost": decimal}),
                },
            }
        ),
    }
