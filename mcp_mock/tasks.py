"""Reading the bundled task suites (JSONL, one task per line, in the task format of env.tasks)."""

from __future__ import annotations

import json
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"
SPLITS = ("train", "val", "test")


def load_tasks(split: str) -> list[dict]:
    """The tasks of a split ("train", "val" or "test"), in file order."""
    if split not in SPLITS:
        raise ValueError(f"unknown task split {split!r}; the splits are {', '.join(SPLITS)}")
    path = TASKS_DIR / f"{split}.jsonl"
    tasks = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            tasks.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
    return tasks
