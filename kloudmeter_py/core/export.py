"""A billing export's shape: a meter query's rows, one per subject x groups x window, ordered
for reading a customer at a time, as CSV lines or as pieces of one JSON document.

Pure: the gateway runs the query (``store.query.run_query``) and streams what these return.
"""

import csv
import io
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from itertools import islice
from operator import attrgetter
from typing import Any, Protocol, TypeVar

from kloudmeter_py.core.models import encoder

FORMATS = {"csv": "text/csv", "json": "application/json"}
ROWS_PER_CHUNK = 1000  # rows per piece written: the answer streams, the loop breathes


class Row(Protocol):
    """One row of a query's answer (the gateway's ``QueryRow``)."""

    @property
    def value(self) -> int | float | None: ...
    @property
    def windowStart(self) -> datetime: ...
    @property
    def windowEnd(self) -> datetime: ...
    @property
    def subject(self) -> str | None: ...
    @property
    def groupBy(self) -> Mapping[str, str | None]: ...


R = TypeVar("R", bound=Row)


def columns(group_by: Sequence[str]) -> list[str]:
    """The CSV header: a group's column is ``groupBy.<group>`` (a group may be named
    ``value`` or ``subject``; its column never clashes with the fixed ones)."""
    return ["subject", *(f"groupBy.{g}" for g in group_by), "windowStart", "windowEnd", "value"]


def ordered(rows: Iterable[R], group_by: Sequence[str]) -> list[R]:
    """Rows by subject, then groups, then window: one customer's usage together."""

    def key(row: R) -> tuple[Any, ...]:
        groups = tuple(_none_first(row.groupBy.get(g)) for g in group_by)
        return (_none_first(row.subject), groups, row.windowStart)

    out = list(rows)
    if not group_by:
        # Subject and window compared as they are (a key made in C, no tuple of tuples per
        # row: 20,000 rows in ~1/3 of the time), unless a subject is none: that comparison
        # raises, and the rows are sorted again with none first.
        try:
            out.sort(key=_SUBJECT_WINDOW)
        except TypeError:
            pass
        else:
            return out
    out.sort(key=key)
    return out


_SUBJECT_WINDOW = attrgetter("subject", "windowStart")


def _none_first(value: str | None) -> tuple[bool, str]:
    return (value is not None, value or "")


def time_text(t: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, as the JSON answers write times."""
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def cell(value: object) -> str:
    """A value as its CSV cell: empty for none, JSON's spelling for numbers."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return time_text(value)
    if isinstance(value, bool | int | float):
        return encoder.encode(value).decode()
    return str(value)


def _window_texts(row: Row, times: dict[datetime, str]) -> tuple[str, str]:
    """A row's window start and end as text, each written once per export (``times``)."""
    start = times.get(row.windowStart)
    if start is None:
        start = times[row.windowStart] = time_text(row.windowStart)
    end = times.get(row.windowEnd)
    if end is None:
        end = times[row.windowEnd] = time_text(row.windowEnd)
    return start, end


def _plain_record(
    row: Row, group_by: Sequence[str], times: dict[datetime, str]
) -> tuple[str, str, str, str]:
    """``csv_record`` of a row split by no group, its cells spelled as ``cell`` spells
    them (an export's subject is text, its value mostly an integer)."""
    subject = row.subject
    value = row.value
    start, end = _window_texts(row, times)
    return (
        subject if type(subject) is str else cell(subject),
        start,
        end,
        str(value) if type(value) is int else cell(value),
    )


def csv_record(row: Row, group_by: Sequence[str], times: dict[datetime, str]) -> list[str]:
    """A row's CSV cells; ``times`` holds the window times already written as text (an
    export has few windows and many rows of each)."""
    start, end = _window_texts(row, times)
    return [
        cell(row.subject),
        *(cell(row.groupBy.get(g)) for g in group_by),
        start,
        end,
        cell(row.value),
    ]


def csv_chunks(
    rows: Iterable[Row], group_by: Sequence[str], per_chunk: int = ROWS_PER_CHUNK
) -> Iterator[bytes]:
    """The header line, then the rows ``per_chunk`` at a time (RFC 4180: CRLF, quoted where a
    cell holds a comma, quote or line break)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(columns(group_by))
    times: dict[datetime, str] = {}
    record = csv_record if group_by else _plain_record
    commas = len(group_by) + 3
    write = buffer.write
    left = iter(rows)
    while chunk := list(islice(left, per_chunk)):
        for row in chunk:
            cells = record(row, group_by, times)
            line = ",".join(cells)
            # A line whose cells hold no comma, quote or line break is the cells as they
            # are (what the csv writer makes of them, at a third of its cost); others are
            # the writer's.
            if line.count(",") == commas and not _SPECIAL.search(line):
                write(line + "\r\n")
            else:
                writer.writerow(cells)
        if len(chunk) == per_chunk:
            yield _drain(buffer)
    yield _drain(buffer)


_SPECIAL = re.compile('["\r\n\0]')


def _drain(buffer: io.StringIO) -> bytes:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text.encode()


def json_chunks(
    head: Mapping[str, Any], rows: Sequence[Row], per_chunk: int = ROWS_PER_CHUNK
) -> Iterator[bytes]:
    """One JSON document, the query answer's shape: ``head``'s fields, then ``data`` with the
    rows (msgspec-encodable: structs), ``per_chunk`` at a time."""
    opening = encoder.encode({**head, "data": []})
    assert opening.endswith(b"[]}")
    yield opening[:-2]
    for i in range(0, len(rows), per_chunk):
        piece = encoder.encode(rows[i : i + per_chunk])[1:-1]
        yield piece if i == 0 else b"," + piece
    yield b"]}"


def openmeter_columns(group_by: Sequence[str], customers: bool = False) -> list[str]:
    """The CSV header of OpenMeter's query answer (``Accept: text/csv``): window_start,
    window_end, subject, customer_id (with ``customers``: a query by filterCustomerId), the
    groups asked for (by their names), value."""
    customer = ["customer_id"] if customers else []
    return ["window_start", "window_end", "subject", *customer, *group_by, "value"]


def openmeter_csv(rows: Iterable[Row], group_by: Sequence[str], customers: bool = False) -> bytes:
    """A query's rows as OpenMeter's CSV (RFC 4180, CRLF), by window, then subject (or
    customer) and groups; an empty cell for a subject the rows are not split by, or an
    absent group."""

    def key(row: Row) -> tuple[Any, ...]:
        groups = tuple(_none_first(row.groupBy.get(g)) for g in group_by)
        customer = _none_first(getattr(row, "customerId", None))
        return (row.windowStart, _none_first(row.subject), customer, groups)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(openmeter_columns(group_by, customers))
    for row in sorted(rows, key=key):
        customer = [cell(getattr(row, "customerId", None))] if customers else []
        writer.writerow(
            [
                time_text(row.windowStart),
                time_text(row.windowEnd),
                cell(row.subject),
                *customer,
                *(cell(row.groupBy.get(g)) for g in group_by),
                cell(row.value),
            ]
        )
    return buffer.getvalue().encode()
