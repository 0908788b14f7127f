"""JSONPath, compiled once per meter.

A plain chain such as ``$.a.b`` (the common case) is a tuple of dict keys and costs a few dict
lookups per event. Anything else is parsed by jsonpath-ng once, when the meter is registered.
"""

import re
from collections.abc import Callable
from typing import Any

from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
from jsonpath_ng.ext.parser import parse as jsonpath_parse

_SIMPLE = re.compile(r"\$((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
MISSING: Any = object()


class PathError(ValueError):
    """A JSONPath that does not compile, or that matched more than one value."""


Finder = Callable[[Any], Any]


def compile_path(path: str) -> Finder:
    """Return a function that gives the single value at ``path`` in a document, or MISSING."""
    if not isinstance(path, str) or not path.startswith("$"):
        raise PathError(f"must be a JSONPath starting with '$', got {path!r}")
    simple = _SIMPLE.fullmatch(path)
    if simple:
        keys = tuple(simple.group(1)[1:].split("."))
        return _chain(keys)
    try:
        expr = jsonpath_parse(path)
    except (JsonPathLexerError, JsonPathParserError, Exception) as exc:
        raise PathError(f"invalid JSONPath {path!r}: {exc}") from exc

    def find(doc: Any) -> Any:
        found = expr.find(doc)
        if not found:
            return MISSING
        if len(found) > 1:
            raise PathError(f"{path} matched {len(found)} values, expected one")
        return found[0].value

    return find


def _chain(keys: tuple[str, ...]) -> Finder:
    if len(keys) == 1:
        (only,) = keys

        def find_one(doc: Any) -> Any:
            if isinstance(doc, dict):
                return doc.get(only, MISSING)
            return MISSING

        return find_one

    def find(doc: Any) -> Any:
        for key in keys:
            if not isinstance(doc, dict):
                return MISSING
            doc = doc.get(key, MISSING)
            if doc is MISSING:
                return MISSING
        return doc

    return find
