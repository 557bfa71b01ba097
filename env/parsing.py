"""Tool-call parsing for the Qwen3 / Hermes format.

A turn is free text with zero or more blocks::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "17 * 23 + 5"}}
    </tool_call>

Reasoning inside ``<think>...</think>`` is never executed. The block pattern is the one vLLM's Hermes
parser uses, ``<tool_call>(.*?)</tool_call>|<tool_call>(.*)`` with DOTALL, so a last block left open
because generation stopped at the eos token is still parsed.

A call must be a JSON object with a string ``name`` and an object ``arguments``. A missing
``arguments`` key is invalid, as in vLLM's parser and the README's reward matrix: the Qwen3 chat template
always renders ``"arguments": {}`` for a call without arguments, so the model has seen that form.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_FORMAT_HINT = 'write {"name": ..., "arguments": {...}}'
_MAX_ERROR_SNIPPET = 80


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """One call written in the format ``parse_turn`` reads (what an oracle call looks like as a turn)."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


@dataclass
class ParsedCall:
    """One ``<tool_call>`` block: a valid call (``error`` is None) or the reason it is invalid JSON."""

    name: str | None
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    raw: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A plain-dict view for ``info["calls"]``."""
        return {"name": self.name, "arguments": self.arguments, "error": self.error}


@dataclass
class ParsedTurn:
    """An assistant turn split into its calls and the free text outside calls and reasoning."""

    calls: list[ParsedCall]
    content: str


def strip_reasoning(text: str) -> str:
    """Remove ``<think>`` blocks; an unclosed ``<think>`` hides everything after it.

    A ``</think>`` with no opening tag is the end of reasoning whose opening tag was in the prompt
    (Qwen3's generation prompt can end with ``<think>\\n``), so the text before it is dropped too.

    One left-to-right scan with ``str.find``: linear in the text, whatever it holds (a lazy regex over
    many unclosed ``<think>`` tags is quadratic).
    """
    kept, pos = [], 0
    while (start := text.find(THINK_OPEN, pos)) != -1:
        kept.append(text[pos:start])
        end = text.find(THINK_CLOSE, start + len(THINK_OPEN))
        if end == -1:  # unclosed: it and everything after it are hidden
            pos = len(text)
            break
        pos = end + len(THINK_CLOSE)
    kept.append(text[pos:])
    text = "".join(kept)
    close = text.find(THINK_CLOSE)
    if close != -1:
        text = text[close + len(THINK_CLOSE) :]
    open_ = text.find(THINK_OPEN)
    if open_ != -1:
        text = text[:open_]
    return text


def parse_call(body: str) -> ParsedCall:
    """Parse the inside of one ``<tool_call>`` block; never raises."""
    try:
        obj = json.loads(body)
    except RecursionError:
        return ParsedCall(None, error="invalid tool call: JSON nested too deeply", raw=body)
    except json.JSONDecodeError as exc:
        return ParsedCall(None, error=f"invalid tool call: {exc.msg} at char {exc.pos}", raw=body)
    except ValueError as exc:  # e.g. an integer literal past Python's 4300-digit conversion limit
        return ParsedCall(None, error=f"invalid tool call: {str(exc)[:200]}", raw=body)
    if not isinstance(obj, dict):
        return ParsedCall(
            None, error=f"invalid tool call: expected a JSON object, got {_kind(obj)}", raw=body
        )
    try:  # a lone surrogate escape ("\\ud800") parses, but no transport can send it: it is not Unicode text
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return ParsedCall(
            None,
            error="invalid tool call: a string holds a lone surrogate (\\ud800-\\udfff), not valid Unicode",
            raw=body,
        )
    name, arguments = obj.get("name"), obj.get("arguments")
    if not isinstance(name, str) or not name:
        return ParsedCall(None, error="invalid tool call: 'name' must be a non-empty string", raw=body)
    if "arguments" not in obj:
        return ParsedCall(name, error="invalid tool call: missing 'arguments' (use {} for none)", raw=body)
    if not isinstance(arguments, dict):
        got = _kind(arguments)
        return ParsedCall(
            name, error=f"invalid tool call: 'arguments' must be an object, got {got}", raw=body
        )
    return ParsedCall(name, arguments, raw=body)


def parse_turn(text: str) -> ParsedTurn:
    """Split an assistant turn into tool calls (in order) and the remaining free text."""
    visible = strip_reasoning(text)
    calls = []
    for match in TOOL_CALL_RE.finditer(visible):
        body = match.group(1) if match.group(1) is not None else match.group(2)
        call = parse_call(body.strip())
        if call.error is not None:
            call.error = f"{call.error}; {CALL_FORMAT_HINT}"
        calls.append(call)
    content = TOOL_CALL_RE.sub("", visible).strip()
    return ParsedTurn(calls, content)


def _kind(value: Any) -> str:
    """A JSON type name for an error message, with a short excerpt of the value."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    kind = names.get(type(value), "a number")
    if isinstance(value, str):
        return f"{kind} {value[:_MAX_ERROR_SNIPPET]!r}"
    return kind
