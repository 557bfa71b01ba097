"""Canonical text for numbers, so task checks (result_contains) see one spelling per value."""

from __future__ import annotations

import math

from mcp.server.mcpserver.exceptions import ToolError


def fmt_number(x: float | int) -> str:
    """Integers without ".0", floats rounded to 10 significant digits, -0 as 0."""
    if isinstance(x, bool):
        return str(int(x))
    if isinstance(x, int):
        return str(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    text = f"{x:.10g}"
    return "0" if text in ("-0", "0") else text


def as_number(value: object, name: str) -> float | int:
    """Read a JSON number (or a numeric string) or raise a ToolError naming the argument."""
    if isinstance(value, bool) or value is None:
        raise ToolError(f"expected a number for '{name}', got {value!r}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ToolError(f"expected a number for '{name}', got {value!r}") from None
        return int(number) if number.is_integer() and "." not in value else number
    raise ToolError(f"expected a number for '{name}', got {value!r}")
