"""Training text of the tiny tokenizer: the mock server's train tasks, its tool schemas, and rendered chats.

Every prompt the policy sees carries the tool schemas and the chat markup, so the tokenizer is trained on exactly
those strings (rendered through the chat template) to compress them well.

Only the train split is read: not the val and test splits, and not the server's data files (which hold the
held-out entities too). A token learned from held-out text alone would appear in no training sequence, so its
embedding would stay at its random start and the policy could never write it: measured on an older corpus, 36 of
110 test tasks needed such a token in their solution.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mcp_mock
from env.parsing import call_text

# A few lines of general text, numbers and JSON, so that such pieces have tokens whatever the tasks hold.
BASE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9, 3.14, -42, 1e6.\n"
    'JSON: {"key": "value", "list": [1, 2, 3], "nested": {"ok": true, "none": null}}\n'
    "Tools return data; the assistant reads it and answers the user's question in one sentence.\n"
)
TRAIN_FILES = ("train.jsonl",)


def train_task_files() -> list[Path]:
    """The task files the tokenizer reads (the mock's train split)."""
    tasks_dir = Path(mcp_mock.TASKS_DIR)
    return [tasks_dir / name for name in TRAIN_FILES if (tasks_dir / name).is_file()]


def _read_tasks() -> tuple[list[str], list[dict]]:
    """The raw text of the train task files and their tasks."""
    texts, tasks = [], []
    for path in train_task_files():
        text = path.read_text(encoding="utf-8")
        texts.append(text)
        tasks += [json.loads(line) for line in text.splitlines() if line.strip()]
    return texts, tasks


def mock_tools() -> list[dict[str, Any]]:
    """The mock server's tools as function schemas, listed through the env (the schemas every prompt carries)."""
    from env import MCPGymEnv

    env = MCPGymEnv(tasks=[])
    try:
        return env.tools
    finally:
        env.close()


def render_task(task: dict[str, Any], tools: list[dict], render) -> str:
    """A task's oracle episode (calls, made-up results, a final answer) through the chat template."""
    calls = [c for c in task.get("oracle") or [] if isinstance(c, dict) and "name" in c]
    result = str((task.get("success") or {}).get("result_contains", "done"))
    messages: list[dict[str, Any]] = [{"role": "user", "content": task["prompt"]}]
    if calls:
        text = "\n".join(call_text(c["name"], c.get("arguments") or {}) for c in calls)
        messages.append({"role": "assistant", "content": text})
        messages += [{"role": "tool", "content": result} for _ in calls]
    messages.append({"role": "assistant", "content": f"The answer is {result}."})
    return render(messages, tools=tools, add_generation_prompt=False)


def tokenizer_texts() -> list[str]:
    """The tokenizer's training texts: base text, the train files, the tool schemas, each task's rendered chat."""
    from models.tokenizer import render_chat

    task_texts, tasks = _read_tasks()
    tools = mock_tools()
    chats = [render_task(t, tools, render_chat) for t in tasks]
    schemas = [json.dumps(t, ensure_ascii=False) for t in tools]
    return [BASE_TEXT, *task_texts, *schemas, *chats]
