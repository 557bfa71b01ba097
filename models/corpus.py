"""Training text for the tiny tokenizer: the project's train tasks, tool schemas and chats.

Every prompt the policy sees carries the tool schemas and the chat markup, so the tokenizer is trained
on exactly those strings (rendered through the chat template) to compress them well. When the mock
server's files are absent, a small built-in text keeps the build working.

Only the train split is read: not the val and test splits, and not the server's data files (which hold
the held-out entities too). A token learned from held-out text alone would appear in no training
sequence, so its embedding would stay at its random start and the policy could never write it: measured
on the old corpus, 36 of 110 test tasks needed such a token in their solution.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RenderFn = Callable[..., str]

FALLBACK_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression and return the result.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. 17 * 23 + 5"}},
                "required": ["expression"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Return the current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
]

FALLBACK_TASKS: list[dict[str, Any]] = [
    {
        "prompt": "What is 17*23+5? Use the calculator.",
        "oracle": [{"name": "calculator", "arguments": {"expression": "17*23+5"}}],
        "success": {"result_contains": "396"},
    },
    {
        "prompt": "How warm is it in Paris right now, in celsius?",
        "oracle": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}],
        "success": {"result_contains": "18"},
    },
]

FALLBACK_TEXT = (
    "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9, 3.14, -42, 1e6.\n"
    'JSON: {"key": "value", "list": [1, 2, 3], "nested": {"ok": true, "none": null}}\n'
    "Tools return data; the assistant reads it and answers the user's question in one sentence.\n"
)


def _mock_tasks_dir() -> Path | None:
    """Return the mock server's task folder, or None where the package or folder is absent."""
    try:
        import mcp_mock
    except ImportError:
        return None
    tasks = Path(getattr(mcp_mock, "TASKS_DIR", Path(mcp_mock.__file__).parent / "tasks"))
    return tasks if tasks.is_dir() else None


TRAIN_FILES = ("train.jsonl",)


def _read_tasks(tasks_dir: Path | None) -> tuple[list[str], list[dict]]:
    """Return the raw text of the train task file and its parsed tasks (bad lines skipped)."""
    if tasks_dir is None:
        return [], []
    texts, tasks = [], []
    for path in (tasks_dir / name for name in TRAIN_FILES if (tasks_dir / name).is_file()):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        for line in text.splitlines():
            try:
                task = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(task, dict) and isinstance(task.get("prompt"), str):
                tasks.append(task)
    return texts, tasks


def mock_tool_schemas() -> list[dict[str, Any]]:
    """List the bundled mock server's tools as function schemas, or [] when it cannot be reached."""
    try:
        import anyio
        from mcp import Client

        import mcp_mock
    except ImportError:
        return []
    if not callable(getattr(mcp_mock, "create_server", None)):
        return []

    async def list_tools() -> list[dict[str, Any]]:
        async with Client(mcp_mock.create_server()) as client:
            result = await client.list_tools()
        return [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description or "",
                    "parameters": t.input_schema,
                },
            }
            for t in result.tools
        ]

    try:
        return anyio.run(list_tools)
    except Exception as exc:  # a broken mock server must not stop the tokenizer build
        log.warning("could not list the mock server's tools (%s); using built-in schemas", exc)
        return []


def render_task(task: dict[str, Any], tools: list[dict], render: RenderFn) -> str:
    """Render a task's oracle episode (calls, made-up results, a final answer) through the chat template."""
    from models.tokenizer import tool_call_text

    calls = [c for c in task.get("oracle") or [] if isinstance(c, dict) and "name" in c]
    result = str((task.get("success") or {}).get("result_contains", "done"))
    messages: list[dict[str, Any]] = [{"role": "user", "content": task["prompt"]}]
    if calls:
        text = "\n".join(tool_call_text(c["name"], c.get("arguments") or {}) for c in calls)
        messages.append({"role": "assistant", "content": text})
        messages += [{"role": "tool", "content": result} for _ in calls]
    messages.append({"role": "assistant", "content": f"The answer is {result}."})
    return render(messages, tools=tools, add_generation_prompt=False)


def collect_corpus(render: RenderFn) -> list[str]:
    """Return the tokenizer's training texts; `render(messages, tools=..., **kw)` applies the chat template."""
    task_texts, tasks = _read_tasks(_mock_tasks_dir())
    tools = mock_tool_schemas() or FALLBACK_TOOLS
    tasks = tasks or FALLBACK_TASKS
    chats = [render_task(t, tools, render) for t in tasks]
    schemas = [json.dumps(t, ensure_ascii=False) for t in tools]
    return [FALLBACK_TEXT, *task_texts, *schemas, *chats]
