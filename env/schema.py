"""Tool schemas: the OpenAI function form the chat template wants, and argument checks before a call.

The 2.x SDK server does not check arguments against ``inputSchema`` in every path and silently drops
extra arguments, so the env validates with ``jsonschema`` first: a bad argument is then a
``tool_error`` with the same message on every server. ``additionalProperties`` is honoured as each
schema states it.
"""

from __future__ import annotations

from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError, best_match

_TYPE_NAMES = {
    "number": "a number",
    "integer": "an integer",
    "string": "a string",
    "object": "an object",
    "array": "an array",
    "boolean": "a boolean",
    "null": "null",
}
_MAX_REPR = 60
_MAX_MESSAGE = 300


def openai_tool(tool: Any) -> dict[str, Any]:
    """An MCP ``Tool`` as an OpenAI function schema (the form chat templates render)."""
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description or "",
            "parameters": dict(tool.input_schema or {"type": "object", "properties": {}}),
        },
    }


def make_validator(schema: dict[str, Any]) -> Any | None:
    """A jsonschema validator for a tool's input schema, or None when the schema itself is broken.

    A server's broken schema is not the model's fault, so such a tool's arguments go through unchecked.
    """
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
        return cls(schema)
    except (jsonschema.SchemaError, TypeError, ValueError, RecursionError):
        return None


def argument_error(validator: Any | None, arguments: dict[str, Any]) -> str | None:
    """A one-sentence reason why ``arguments`` break the schema, or None when they fit."""
    if validator is None:
        return None
    try:
        error = best_match(validator.iter_errors(arguments))
        return None if error is None else describe_violation(error)
    except RecursionError:
        return "arguments are nested too deeply"


def describe_violation(error: ValidationError) -> str:
    """Turn a jsonschema error into a message a model can act on."""
    path = ".".join(str(p) for p in error.absolute_path)
    where = f"argument '{path}'" if path else "arguments"
    kind = error.validator
    if kind == "type":
        expected = error.validator_value
        names = [expected] if isinstance(expected, str) else list(expected)
        wanted = " or ".join(_TYPE_NAMES.get(n, str(n)) for n in names)
        message = f"{where} must be {wanted}, got {_short_repr(error.instance)}"
    elif kind == "required" and isinstance(error.instance, dict):
        missing = [k for k in error.validator_value if k not in error.instance]
        message = f"missing required argument '{path + '.' if path else ''}{missing[0]}'"
    elif kind == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(str(k) for k in error.instance if k not in allowed)
        message = f"unexpected argument(s) {', '.join(repr(e) for e in extra)}; allowed: {', '.join(sorted(allowed))}"
    elif kind == "enum":
        options = ", ".join(_short_repr(v) for v in error.validator_value)
        message = f"{where} must be one of {options}, got {_short_repr(error.instance)}"
    else:
        message = f"{where}: {error.message}"
    return message[:_MAX_MESSAGE]


def _short_repr(value: Any) -> str:
    """``repr`` cut short, so a giant argument does not flood the tool message."""
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."
