"""Task loading and validation: JSONL files or lists of dicts, with errors that name the line.

A task is one JSON object a line (the README, "Training on your own MCP server")::

    {"id": "math-017", "prompt": "What is 17*23+5? Use the calculator.",
     "success": {"tool": "calculator", "result_contains": "396"}, "max_turns": 4,
     "oracle": [{"name": "calculator", "arguments": {"expression": "17*23+5"}}]}

Required keys: ``id``, ``prompt``, ``success``. Optional: ``category``, ``max_turns``, ``oracle``, ``tools``,
``setup``; other keys are kept and ignored. ``success`` conditions are listed in :data:`SUCCESS_KEYS`.

A *conversation* has a list of user turns as its ``prompt``: the next one arrives when the model ends a turn
without a call and ``success`` holds, checked anew at the end of every user turn. Its ``oracle`` is then a list of
calls per user turn, and ``max_turns`` counts the assistant turns of each user turn. ``tools`` names the server
tools the task may see (the others are hidden from the model, and calling one is a ``structural_fail``);
``setup`` is a list of calls made at reset on the episode's state, which the model never sees::

    {"id": "trip-3", "prompt": ["Book the 9am train.", "Now cancel it."], "tools": ["book", "cancel"],
     "setup": [{"name": "load_scenario", "arguments": {"id": "trip-3"}}],
     "success": {"probe": {"name": "check_turn", "arguments": {}, "result_contains": "ok"}},
     "oracle": [[{"name": "book", "arguments": {"time": "09:00"}}], [{"name": "cancel", "arguments": {}}]]}
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TaskSource = str | Path | Sequence[dict[str, Any]] | None

SUCCESS_KEYS = (
    "tool",
    "result_contains",
    "result_equals",
    "result_regex",
    "result_number",
    "tolerance",
    "answer_contains",
    "probe",
)
PROBE_KEYS = ("name", "arguments", "result_contains")


class TaskError(ValueError):
    """A task file or task dict that cannot be used, with the place it came from."""


def load_tasks(source: TaskSource = None) -> list[dict[str, Any]]:
    """Load and validate tasks from a JSONL path, a list of dicts, or None (the mock's train split)."""
    if source is None:
        import mcp_mock  # the bundled default; imported here so env works without it for other tasks

        return load_tasks(list(mcp_mock.load_tasks("train")))
    if isinstance(source, (str, Path)):
        return _load_jsonl(Path(source))
    tasks = [_validated(task, f"task {i}") for i, task in enumerate(source)]
    _check_unique(tasks, [f"task {i}" for i in range(len(tasks))])
    return tasks


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read one task per non-blank line; errors say ``<file> line N: ...``."""
    tasks, places = [], []
    for place, task, error in task_lines(path):
        if error is not None:
            raise error
        tasks.append(task)
        places.append(place)
    if not tasks:
        raise TaskError(f"task file {str(path)!r} holds no tasks")
    _check_unique(tasks, places)
    return tasks


def task_lines(path: str | Path) -> list[tuple[str, dict[str, Any] | None, TaskError | None]]:
    """Every non-blank line of a task file as ``(place, task, None)`` or ``(place, None, error)``.

    ``load_tasks`` stops at the first bad line; a checker (``python -m ppo.tasks check``) reports them all.
    Duplicate ids are not checked here (``duplicate_ids`` finds them).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise TaskError(f"cannot read task file {str(path)!r}: {reason}") from None
    out: list[tuple[str, dict[str, Any] | None, TaskError | None]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        place = f"{path.name} line {number}"
        try:
            task = json.loads(line)
        except (ValueError, RecursionError) as exc:
            out.append((place, None, TaskError(f"{place}: not valid JSON: {exc}")))
            continue
        try:
            out.append((place, _validated(task, place), None))
        except TaskError as exc:
            out.append((place, None, exc))
    return out


def duplicate_ids(tasks: Sequence[dict[str, Any]], places: Sequence[str]) -> dict[str, str]:
    """``{place: reason}`` for every task whose id an earlier task already uses."""
    seen: dict[str, str] = {}
    problems = {}
    for task, place in zip(tasks, places, strict=True):
        if task["id"] in seen:
            problems[place] = f"duplicate task id {task['id']!r} (first at {seen[task['id']]})"
        else:
            seen[task["id"]] = place
    return problems


def _validated(task: Any, place: str) -> dict[str, Any]:
    """Check one task's keys and types; return it unchanged."""
    if not isinstance(task, dict):
        raise TaskError(f"{place}: a task must be a JSON object, got {type(task).__name__}")
    if not isinstance(task.get("id"), str) or not task["id"]:
        raise TaskError(f"{place}: missing key 'id' (a non-empty string)")
    prompt = task.get("prompt")
    if not (isinstance(prompt, str) and prompt) and not (
        isinstance(prompt, list) and prompt and all(isinstance(p, str) and p for p in prompt)
    ):
        raise TaskError(
            f"{place}: missing key 'prompt' (a non-empty string, or a list of them: the user turns)"
        )
    if not isinstance(task.get("success"), dict):
        raise TaskError(f"{place}: missing key 'success' (an object of success conditions)")
    _check_success(task["success"], place)
    max_turns = task.get("max_turns")
    if "max_turns" in task and (
        isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1
    ):
        raise TaskError(f"{place}: 'max_turns' must be a positive integer, got {max_turns!r}")
    if is_conversation(task):
        oracle = task.get("oracle")
        if oracle is not None and (not isinstance(oracle, list) or len(oracle) != len(task["prompt"])):
            raise TaskError(f"{place}: the 'oracle' of a conversation is a list of calls per user turn")
        for calls in oracle or []:
            _check_calls(calls, "oracle", place)
    else:
        _check_calls(task.get("oracle"), "oracle", place)
    _check_calls(task.get("setup"), "setup", place)
    tools = task.get("tools")
    if "tools" in task and (
        not isinstance(tools, list)
        or not all(isinstance(t, str) and t for t in tools)
        or len(set(tools)) < len(tools)
    ):
        raise TaskError(f"{place}: 'tools' must be a list of distinct tool names")
    return task


def is_conversation(task: dict[str, Any]) -> bool:
    """Whether the task's prompt is a list of user turns."""
    return isinstance(task["prompt"], list)


def user_turns(task: dict[str, Any]) -> list[str]:
    """The task's user messages, in order (one for a plain task)."""
    return list(task["prompt"]) if is_conversation(task) else [task["prompt"]]


def oracle_by_turn(task: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The oracle's calls per user turn (one list for a plain task); [] without an oracle."""
    oracle = task.get("oracle") or []
    if is_conversation(task):
        return [list(calls) for calls in oracle]
    return [list(oracle)] if oracle else []


def _check_success(success: dict[str, Any], place: str) -> None:
    """Reject unknown or ill-typed success conditions, and a success with none."""
    unknown = sorted(set(success) - set(SUCCESS_KEYS))
    if unknown:
        raise TaskError(f"{place}: unknown success key(s) {unknown}; known keys: {', '.join(SUCCESS_KEYS)}")
    if not set(success) - {"tolerance"}:
        raise TaskError(f"{place}: 'success' needs at least one condition")
    for key in ("tool", "result_equals", "result_regex"):
        if key in success and not isinstance(success[key], str):
            raise TaskError(f"{place}: success {key!r} must be a string")
    for key in ("result_contains", "answer_contains"):
        if key in success and not _is_text_or_texts(success[key]):
            raise TaskError(f"{place}: success {key!r} must be a string or a list of strings")
    if "result_regex" in success:
        try:
            re.compile(success["result_regex"])
        except re.error as exc:
            raise TaskError(f"{place}: success 'result_regex' is not a valid regex: {exc}") from None
    for key in ("result_number", "tolerance"):
        if key in success and not _is_number(success[key]):
            raise TaskError(f"{place}: success {key!r} must be a number")
    if "tolerance" in success and ("result_number" not in success or success["tolerance"] < 0):
        raise TaskError(f"{place}: success 'tolerance' must be >= 0 and goes with 'result_number'")
    if "probe" in success:
        _check_probe(success["probe"], place)


def _check_probe(probe: Any, place: str) -> None:
    """A probe is a call the verifier makes after the turn and the text its result must contain."""
    if not isinstance(probe, dict) or set(probe) - set(PROBE_KEYS):
        raise TaskError(f"{place}: success 'probe' must be an object with keys {', '.join(PROBE_KEYS)}")
    if not isinstance(probe.get("name"), str) or not isinstance(probe.get("arguments", {}), dict):
        raise TaskError(f"{place}: success 'probe' needs a string 'name' and an object 'arguments'")
    if not _is_text_or_texts(probe.get("result_contains")):
        raise TaskError(f"{place}: success 'probe' needs 'result_contains' (a string or list of strings)")


def _check_calls(calls: Any, key: str, place: str) -> None:
    """An oracle (of one user turn) or a setup, when present, is a list of calls in the tool-call format."""
    if calls is None:
        return
    ok = isinstance(calls, list) and all(
        isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments"), dict)
        for c in calls
    )
    if not ok:
        raise TaskError(f"{place}: {key!r} must be a list of {{'name': str, 'arguments': object}} calls")


def _check_unique(tasks: list[dict[str, Any]], places: list[str]) -> None:
    """Task ids pick tasks, so they must be unique."""
    problems = duplicate_ids(tasks, places)
    if problems:
        place, reason = next(iter(problems.items()))  # the first duplicate, in file order
        raise TaskError(f"{place}: {reason}")


def _is_text_or_texts(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
