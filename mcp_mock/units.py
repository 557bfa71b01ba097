"""Unit conversion between exact symbols; common spellings are refused with a hint to the symbol."""

from __future__ import annotations

from mcp.server.mcpserver.exceptions import ToolError

from .fmt import as_number, fmt_number

# Factors to the family's base unit (exact definitions: 1 mi = 1609.344 m, 1 lb = 0.45359237 kg).
FACTORS: dict[str, dict[str, float]] = {
    "length": {
        "m": 1,
        "km": 1000,
        "cm": 0.01,
        "mm": 0.001,
        "mi": 1609.344,
        "ft": 0.3048,
        "in": 0.0254,
        "yd": 0.9144,
    },
    "mass": {"kg": 1, "g": 0.001, "t": 1000, "lb": 0.45359237, "oz": 0.028349523125},
    "time": {"s": 1, "min": 60, "h": 3600, "day": 86400},
    "volume": {"l": 1, "ml": 0.001, "gal": 3.785411784},
    "temperature": {"C": 1, "F": 1, "K": 1},
}
FAMILY = {unit: family for family, units in FACTORS.items() for unit in units}

# Spellings a model is likely to try; they are not accepted, only named in the error.
ALIASES = {
    "kms": "km", "kilometers": "km", "kilometres": "km", "meters": "m", "metres": "m", "miles": "mi",
    "mile": "mi", "feet": "ft", "foot": "ft", "inches": "in", "yards": "yd", "kgs": "kg",
    "kilograms": "kg", "grams": "g", "pounds": "lb", "lbs": "lb", "ounces": "oz", "tons": "t",
    "seconds": "s", "secs": "s", "minutes": "min", "mins": "min", "hours": "h", "hrs": "h",
    "days": "day", "liters": "l", "litres": "l", "gallons": "gal", "celsius": "C", "fahrenheit": "F",
    "kelvin": "K",
}  # fmt: skip


def _check_unit(unit: str, other: str) -> str:
    if unit in FAMILY:
        return unit
    hint = ALIASES.get(unit.lower()) or next((u for u in FAMILY if u.lower() == unit.lower()), None)
    family = FAMILY.get(hint or other, "length")
    known = ", ".join(FACTORS[family])
    prefix = f"unknown unit '{unit}'" + (f" (did you mean '{hint}'?)" if hint else "")
    raise ToolError(f"{prefix}; known {family} units: {known}")


def _to_kelvin(value: float, unit: str) -> float:
    return {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[unit]


def _from_kelvin(value: float, unit: str) -> float:
    return {"C": value - 273.15, "F": (value - 273.15) * 9 / 5 + 32, "K": value}[unit]


def convert(value: object, from_unit: str, to_unit: str) -> str:
    """Convert value from one unit to another and return 'V from = W to'."""
    number = as_number(value, "value")
    from_unit = _check_unit(from_unit.strip(), to_unit.strip())
    to_unit = _check_unit(to_unit.strip(), from_unit)
    if FAMILY[from_unit] != FAMILY[to_unit]:
        raise ToolError(
            f"cannot convert {FAMILY[from_unit]} unit '{from_unit}' to {FAMILY[to_unit]} unit '{to_unit}'"
        )
    if FAMILY[from_unit] == "temperature":
        result = _from_kelvin(_to_kelvin(number, from_unit), to_unit)
    else:
        family = FACTORS[FAMILY[from_unit]]
        result = number * family[from_unit] / family[to_unit]
    return f"{fmt_number(number)} {from_unit} = {fmt_number(result)} {to_unit}"
