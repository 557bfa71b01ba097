"""BFCL's entries as tasks of this project's format, and its function docs as MCP tool schemas.

One multi-turn entry becomes one task (README, "Task format", conversations)::

    {"id": "multi_turn_base_0", "category": "multi_turn_base",
     "prompt": ["Move 'final_report.pdf' ...", "Perform a detailed search ...", ...],   # one per user turn
     "tools": ["cd", "mv", "grep", ..., "post_tweet", ...],      # the functions of the entry's backend classes
     "setup": [{"name": "bfcl_load_scenario", "arguments": {"entry_id": "multi_turn_base_0"}}],
     "success": {"probe": {"name": "bfcl_verify_turn", "arguments": {}, "result_contains": "\\"valid\\": true"}},
     "oracle": [[{"name": "cd", "arguments": {"folder": "document"}}, ...], ...],  # BFCL's ground truth per turn
     "max_turns": 20}                                              # BFCL's step limit per user turn

The setup call loads the entry's ``initial_config`` into the episode's own backend instances on the server; the
probe runs BFCL's checker after each user turn. Neither tool is in ``tools``, so the model never sees them.

A single-turn (AST) entry becomes a conversation of one user turn: the calls, then a final answer that ends the
turn, when BFCL's AST checker judges every call the episode made against the possible answers (``irrelevance``:
valid when it made none). ``max_turns`` is the number of calls in the answer plus one (at least 2), so the calls
fit however many a turn the env runs; extra calls only fail the checker. Its oracle is built from the first
possible answer (``first_answer``).
"""

from __future__ import annotations

import ast
import inspect
import json
from functools import cache
from typing import Any

from . import _bfcl

MULTI_TURN_CATEGORIES = ("multi_turn_base", "multi_turn_miss_param", "multi_turn_long_context")
"""The multi-turn categories served: every user turn is one user message and the tools stay the same throughout
(``multi_turn_miss_func`` adds a function in a later turn, which a task's fixed tool list cannot express)."""

AST_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
"""The single-turn categories judged by BFCL's AST checker (Python; Java and JavaScript are not served)."""

SETUP_TOOL = "bfcl_load_scenario"
VERIFY_TOOL = "bfcl_verify_turn"
VALID = '"valid": true'

# BFCL's parameter types (ast_checker.PYTHON_TYPE_MAPPING's names) as JSON Schema types.
_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": None}


def json_schema(doc: dict[str, Any]) -> dict[str, Any]:
    """A BFCL parameter doc (``{"type": "dict", "properties": ...}``, its own type names) as JSON Schema."""
    out: dict[str, Any] = {}
    kind = doc.get("type")
    if kind is not None:
        mapped = _TYPES.get(kind, kind)
        if mapped is not None:
            out["type"] = mapped
    for key in ("description", "enum", "default", "required", "format"):
        if key in doc:
            out[key] = doc[key]
    if "properties" in doc:
        out["properties"] = {name: json_schema(p) for name, p in doc["properties"].items()}
        out.setdefault("type", "object")
    if "items" in doc:
        out["items"] = json_schema(doc["items"])
    if "additionalProperties" in doc and isinstance(doc["additionalProperties"], dict):
        out["additionalProperties"] = json_schema(doc["additionalProperties"])
    return out


@cache
def function_docs() -> dict[str, list[dict[str, Any]]]:
    """Each multi-turn backend class's function docs (BFCL's ``multi_turn_func_doc``)."""
    config = _bfcl.backend_config()
    folder = _bfcl.data_dir() / "multi_turn_func_doc"
    return {
        cls: _jsonl(folder / config.MULTI_TURN_FUNC_DOC_FILE_MAPPING[cls])
        for cls in config.CLASS_FILE_PATH_MAPPING
        if cls in _MULTI_TURN_CLASSES
    }


_MULTI_TURN_CLASSES = (
    "GorillaFileSystem", "MathAPI", "MessageAPI", "TwitterAPI", "TicketAPI", "TradingBot", "TravelAPI",
    "VehicleControlAPI",
)  # fmt: skip


CATEGORIES = MULTI_TURN_CATEGORIES + AST_CATEGORIES


@cache
def entries(category: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """A category's BFCL entries and their ground truth, in file order: call strings per user turn (multi-turn),
    possible answers (AST), None (``irrelevance``, which has none)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; served: {', '.join(CATEGORIES)}")
    data = _bfcl.data_dir()
    found = _jsonl(data / f"BFCL_v4_{category}.json")
    if category == "irrelevance":
        return found, [None] * len(found)
    truth = {
        e["id"]: e["ground_truth"] for e in _jsonl(data / "possible_answer" / f"BFCL_v4_{category}.json")
    }
    return found, [truth[e["id"]] for e in found]


def category_of(entry_id: str) -> str:
    """``multi_turn_base_12`` -> ``multi_turn_base``."""
    return entry_id.rsplit("_", 1)[0]


@cache
def entry_by_id(entry_id: str) -> tuple[dict[str, Any], Any, int]:
    """One entry, its ground truth and its index in its category's file, found by id (``multi_turn_base_12``)."""
    category = category_of(entry_id)
    if category not in CATEGORIES:
        raise KeyError(f"no BFCL entry {entry_id!r} (categories served: {', '.join(CATEGORIES)})")
    found, truth = entries(category)
    for index, (entry, answer) in enumerate(zip(found, truth, strict=True)):
        if entry["id"] == entry_id:
            return entry, answer, index
    raise KeyError(f"no BFCL entry {entry_id!r} in {category}")


def parse_call(text: str, classes: list[str]) -> dict[str, Any]:
    """A ground-truth call string (``mv(source='a', destination='b')``, ``sort('f.pdf')``) as a tool call
    ``{"name", "arguments"}``; positional arguments are named from the backend method's signature."""
    node = ast.parse(text.strip(), mode="eval").body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"not a function call: {text!r}")
    name = node.func.id
    args = [ast.literal_eval(a) for a in node.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
    method = next(
        (getattr(_bfcl.backend_class(c), name) for c in classes if hasattr(_bfcl.backend_class(c), name)),
        None,
    )
    if method is None:
        raise ValueError(f"{name!r} is a method of none of {classes}")
    bound = inspect.signature(method).bind(None, *args, **kwargs)  # None stands for self
    bound.arguments.pop(next(iter(inspect.signature(method).parameters)))
    return {"name": name, "arguments": dict(bound.arguments)}


@cache
def ast_tools(category: str) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, int], str]]:
    """An AST category's functions as tools: ``{tool name: BFCL function doc}`` and ``{(entry index, k): tool
    name}`` for the k-th function of each entry.

    MCP gives a server one tool namespace, and entries of one category define functions of the same name
    differently (27 names in ``simple_python``). The first definition of a name keeps it; each other one is
    served as ``<name>__<n>`` (n = 2, 3, ...), which the server maps back to BFCL's name before the checker
    sees the call.
    """
    found, _ = entries(category)
    tools: dict[str, dict[str, Any]] = {}
    spelled: dict[str, str] = {}  # a definition (its JSON) -> the tool name it is served as
    names: dict[tuple[str, int], str] = {}
    for index, entry in enumerate(found):
        for k, doc in enumerate(entry["function"]):
            key = json.dumps(doc, sort_keys=True)
            if key not in spelled:
                name, n = doc["name"], 2
                while name in tools:
                    name, n = f"{doc['name']}__{n}", n + 1
                spelled[key], tools[name] = name, doc
            names[(index, k)] = spelled[key]
    return tools, names


def first_answer(possible: dict[str, dict[str, list[Any]]], doc: dict[str, Any]) -> dict[str, Any]:
    """One call from a possible answer ``{name: {param: [values]}}`` of the function ``doc``: each parameter's first
    value, nested dicts alike. ``""`` among the values marks a parameter that may be left out: it is, unless the
    doc requires it (then it takes its first other value). Leaving out is the safer choice: in
    ``parallel_multiple_26`` the answer allows ``type="credit"``, which the function's doc does not declare, and
    the checker refuses it."""
    ((name, params),) = possible.items()
    required = set(doc.get("parameters", {}).get("required", []))
    return {"name": name, "arguments": _first_values(params, required)}


_OMIT = object()


def _first_values(options_by_key: dict[str, Any], required: set[str]) -> dict[str, Any]:
    out = {}
    for key, options in options_by_key.items():
        value = _pick(options, key in required) if isinstance(options, list) else options
        if value is not _OMIT:
            out[key] = _resolve(value)
    return out


def _pick(options: list[Any], required: bool) -> Any:
    if "" in options and not required:
        return _OMIT
    return next((o for o in options if o != ""), _OMIT)


def _resolve(value: Any) -> Any:
    """A chosen value whose nested dicts still hold lists of possible values."""
    if isinstance(value, dict):
        return _first_values(value, set())
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    return value


def category_tasks(category: str) -> list[dict[str, Any]]:
    """The tasks of one BFCL category (multi-turn or AST)."""
    if category in AST_CATEGORIES:
        return _ast_tasks(category)
    found, truth = entries(category)
    docs = function_docs()
    limit = _bfcl.step_limit()
    tasks = []
    for entry, answer in zip(found, truth, strict=True):
        classes = entry["involved_classes"]
        tasks.append(
            {
                "id": entry["id"],
                "category": category,
                "prompt": [turn[0]["content"] for turn in entry["question"]],
                "tools": [d["name"] for c in classes for d in docs[c]],
                "setup": [{"name": SETUP_TOOL, "arguments": {"entry_id": entry["id"]}}],
                "success": {"probe": {"name": VERIFY_TOOL, "arguments": {}, "result_contains": VALID}},
                "oracle": [[parse_call(c, classes) for c in turn] for turn in answer],
                "max_turns": limit,
            }
        )
    return tasks


def _ast_tasks(category: str) -> list[dict[str, Any]]:
    found, truth = entries(category)
    _, names = ast_tools(category)
    tasks = []
    for index, (entry, answer) in enumerate(zip(found, truth, strict=True)):
        served = [names[(index, k)] for k in range(len(entry["function"]))]
        alias = {entry["function"][k]["name"]: served[k] for k in range(len(served))}
        docs = {f["name"]: f for f in entry["function"]}
        oracle = [first_answer(p, docs.get(next(iter(p)), {})) for p in answer or []]
        tasks.append(
            {
                "id": entry["id"],
                "category": category,
                "prompt": [" ".join(m["content"] for m in entry["question"][0] if m["role"] == "user")],
                "tools": served,
                "setup": [{"name": SETUP_TOOL, "arguments": {"entry_id": entry["id"]}}],
                "success": {"probe": {"name": VERIFY_TOOL, "arguments": {}, "result_contains": VALID}},
                "oracle": [[{**c, "name": alias.get(c["name"], c["name"])} for c in oracle]],
                "max_turns": max(len(oracle), 1) + 1,  # the calls, one a turn if need be, then the answer
            }
        )
    return tasks


def _jsonl(path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
