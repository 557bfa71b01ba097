"""Data processing over plain JSON: statistics of numbers, sort/filter/group of records, CSV parsing."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Callable
from contextlib import contextmanager

from mcp.server.mcpserver.exceptions import ToolError

from .fmt import as_number, fmt_number

MAX_ITEMS = 1000
MAX_CSV_CHARS = 20_000

_OPS: dict[str, Callable[[object, object], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "contains": lambda a, b: str(b).lower() in str(a).lower(),
}
_AGGREGATES = ("sum", "mean", "count", "min", "max")


def compute_statistics(numbers: list[object]) -> str:
    """count, sum, mean, median, min, max and sample stdev, one 'name: value' per line."""
    if not numbers:
        raise ToolError("numbers is empty; pass a list such as [4, 8, 15]")
    if len(numbers) > MAX_ITEMS:
        raise ToolError(f"numbers has {len(numbers)} items; the limit is {MAX_ITEMS}")
    values = [as_number(x, f"numbers[{i}]") for i, x in enumerate(numbers)]
    with _overflow_is_a_tool_error():
        stats = {
            "count": len(values),
            "sum": sum(values),
            "mean": statistics.fmean(values),
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0,
        }
        return "\n".join(f"{name}: {fmt_number(value)}" for name, value in stats.items())


@contextmanager
def _overflow_is_a_tool_error():
    """Numbers near the float limit (1e308) overflow in sums; say so instead of failing inside statistics."""
    try:
        yield
    except OverflowError:
        raise ToolError(
            "the numbers are too large to add up (the result overflows); use smaller values"
        ) from None


def _check_records(records: list[object], field: str) -> list[dict]:
    if len(records) > MAX_ITEMS:
        raise ToolError(f"records has {len(records)} items; the limit is {MAX_ITEMS}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ToolError(f'record {i} is not an object; records look like [{{"name": "a", "age": 3}}]')
        if field and field not in record:
            raise ToolError(f"record {i} has no field '{field}'; its fields are {', '.join(record)}")
    return records  # type: ignore[return-value]


def _sort_key(field: str, records: list[dict]) -> Callable[[dict], object]:
    values = [r[field] for r in records]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return lambda r: r[field]
    if all(isinstance(v, str) for v in values):
        return lambda r: r[field].lower()
    raise ToolError(f"field '{field}' mixes numbers and text, so it cannot be sorted")


def sort_records(records: list[object], key: str, descending: bool) -> str:
    """The records sorted by one field, as a JSON array."""
    rows = _check_records(records, key)
    return json.dumps(sorted(rows, key=_sort_key(key, rows), reverse=descending))


def _comparable(a: object, b: object) -> tuple[object, object]:
    # Numbers given as text ("42") compare as numbers, so a model's quoting does not change the answer.
    try:
        return float(a), float(b)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(a), str(b)


def _matches(a: object, op: str, b: object) -> bool:
    if op == "contains":
        return _OPS[op](a, b)
    return _OPS[op](*_comparable(a, b))


def filter_records(records: list[object], field: str, op: str, value: object) -> str:
    """The records whose field compares true against value, with a count line first."""
    if op not in _OPS:
        raise ToolError(f"unknown op '{op}'; the ops are {', '.join(_OPS)}")
    rows = _check_records(records, field)
    kept = [r for r in rows if _matches(r[field], op, value)]
    return f"{len(kept)} of {len(rows)} records match\n{json.dumps(kept)}"


def group_records(records: list[object], by: str, field: str, agg: str) -> str:
    """One 'group: value' line per distinct value of `by`, aggregating `field` with agg."""
    if agg not in _AGGREGATES:
        raise ToolError(f"unknown agg '{agg}'; the aggregates are {', '.join(_AGGREGATES)}")
    rows = _check_records(records, by)
    if agg != "count":
        if not field:
            raise ToolError(f"agg '{agg}' needs a field to aggregate")
        _check_records(rows, field)
    groups: dict[str, list[float]] = {}
    for r in rows:
        value = 0 if agg == "count" else as_number(r[field], field)
        groups.setdefault(str(r[by]), []).append(value)
    fold = {"sum": sum, "mean": statistics.fmean, "count": len, "min": min, "max": max}[agg]
    with _overflow_is_a_tool_error():
        return "\n".join(f"{name}: {fmt_number(fold(values))}" for name, values in sorted(groups.items()))


def _cell(text: str) -> object:
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text else number


def parse_csv(text: str) -> str:
    """CSV with a header row as JSON records (numeric cells become numbers), after a summary line."""
    if len(text) > MAX_CSV_CHARS:
        raise ToolError(f"text is {len(text)} characters long; the limit is {MAX_CSV_CHARS}")
    rows = list(csv.reader(io.StringIO(text.strip())))
    if len(rows) < 2:
        raise ToolError("text needs a header row and at least one data row, for example 'name,age\\nAnn,31'")
    header = [h.strip() for h in rows[0]]
    records = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ToolError(f"line {number} has {len(row)} cells but the header has {len(header)}")
        records.append({h: _cell(c.strip()) for h, c in zip(header, row, strict=True)})
    return f"{len(records)} rows, columns: {', '.join(header)}\n{json.dumps(records)}"
