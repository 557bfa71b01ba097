"""Is a task suite solvable on a server? Static checks against its tools, then each oracle replayed.

``python -m ppo.tasks check TASKS --mcp-server CMD_OR_URL`` is the command line; this module is the logic, so a
user's own code (or ``ppo.train --check-tasks``) can run it too. Each task gets one verdict:

- ``solved``: its oracle, played through ``MCPGymEnv`` one call a turn (in a conversation, each user turn's calls
  and then a final answer, ``ORACLE_ANSWER``), reaches ``success``;
- ``failed``: the oracle ran but did not reach success (the reason names the turn, its status and the tool's
  message, or the success conditions no result met);
- ``broken``: the task cannot be played as written: a line that is not a valid task, a duplicate id, an oracle
  call to a tool the server lacks or with arguments its schema refuses, a success condition or probe naming a
  tool the server lacks, a success ``tool`` that no oracle call uses, an oracle longer than the task's turn limit;
- ``unchecked``: nothing to replay (no oracle), or success needs a final answer (``answer_contains``), which
  an oracle of calls cannot give.

The oracle is replayed on the same env code as training (parsing, schema checks, verification), so a task that
is ``solved`` here is one a policy can solve in training.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from env.parsing import call_text
from env.schema import argument_error, make_validator
from env.tasks import TaskError, duplicate_ids, is_conversation, load_tasks, oracle_by_turn, task_lines

VERDICTS = ("solved", "failed", "broken", "unchecked")
ORACLE_ANSWER = "Done."  # the final answer that ends each user turn of a conversation's oracle
_SNIPPET = 160


def oracle_texts(task: dict[str, Any], max_turns: int) -> list[str]:
    """The assistant turns that play a task's oracle: one call a turn; in a conversation each user turn's calls
    and then a final answer (which ends the user turn). A user turn with more calls than its turns allow
    (``max_turns``, less the answer) gets several calls a turn, as few as fit."""
    if not is_conversation(task):
        return [call_text(c["name"], c.get("arguments", {})) for c in task.get("oracle") or []]
    budget = max(int(task.get("max_turns", max_turns)) - 1, 1)
    texts = []
    for calls in oracle_by_turn(task):
        per_turn = -(-len(calls) // budget)  # ceil
        for start in range(0, len(calls), max(per_turn, 1)):
            chunk = calls[start : start + per_turn]
            texts.append("\n".join(call_text(c["name"], c.get("arguments", {})) for c in chunk))
        texts.append(ORACLE_ANSWER)
    return texts


@dataclass
class TaskReport:
    """The verdict on one task and why."""

    place: str  # "train.jsonl line 12" or "task 3"
    task_id: str | None
    category: str
    verdict: str
    problems: list[str] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)  # env status of each replayed turn

    def as_dict(self) -> dict[str, Any]:
        return {
            "place": self.place,
            "id": self.task_id,
            "category": self.category,
            "verdict": self.verdict,
            "problems": self.problems,
            "statuses": self.statuses,
        }


def static_problems(
    task: dict[str, Any], tools: dict[str, dict[str, Any]], default_max_turns: int
) -> list[str]:
    """What makes ``task`` unplayable on a server with ``tools`` (name -> OpenAI function schema), without
    calling anything."""
    problems = []
    by_turn = oracle_by_turn(task)
    oracle = [c for calls in by_turn for c in calls]
    if "tools" in task:
        missing = [name for name in task["tools"] if name not in tools]
        if missing:
            problems.append(f"'tools' names tools the server does not have: {', '.join(missing)}")
    for k, call in enumerate(task.get("setup") or [], start=1):
        problems += _call_problems(f"setup call {k}", call["name"], call.get("arguments", {}), tools)
    shown = {n: tools[n] for n in task["tools"] if n in tools} if "tools" in task else tools
    for k, call in enumerate(oracle, start=1):
        problems += _call_problems(f"oracle call {k}", call["name"], call.get("arguments", {}), shown)
    success = task["success"]
    if "tool" in success and success["tool"] not in tools:
        problems.append(f"success names tool {success['tool']!r}, which the server does not have")
    if "probe" in success:
        probe = success["probe"]
        problems += _call_problems("success probe", probe["name"], probe.get("arguments", {}), tools)
    if "tool" in success and oracle and success["tool"] not in {c["name"] for c in oracle}:
        problems.append(f"no oracle call uses the success tool {success['tool']!r}")
    max_turns = int(task.get("max_turns", default_max_turns))
    if not is_conversation(task) and len(oracle) > max_turns:
        problems.append(f"the oracle needs {len(oracle)} turns (one call each); max_turns is {max_turns}")
    if is_conversation(task) and max_turns < 2 and any(by_turn):
        problems.append("max_turns is 1: no user turn can hold a call and then the final answer that ends it")
    return problems


def _call_problems(
    what: str, name: str, arguments: dict[str, Any], tools: dict[str, dict[str, Any]]
) -> list[str]:
    if name not in tools:
        return [f"{what}: unknown tool {name!r} (the server has {', '.join(sorted(tools)) or 'no tools'})"]
    problem = argument_error(make_validator(tools[name].get("parameters") or {}), arguments)
    return [] if problem is None else [f"{what} ({name}): {problem}"]


def play_turns(
    env, task_id: str, turns: list[str]
) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """Play ``turns`` (assistant texts) as one episode of ``task_id``; stops when the episode ends.

    Returns ``[(turn, step_info), ...]`` and the reset's info."""
    _obs, first = env.reset(options={"task_id": task_id})
    played = []
    for text in turns:
        _obs, _reward, terminated, truncated, info = env.step(text)
        played.append((text, info))
        if terminated or truncated:
            break
    return played, first


def replay_oracle(env, task: dict[str, Any]) -> TaskReport:
    """Play the task's oracle, one call a turn, and judge the result."""
    report = TaskReport("", task["id"], str(task.get("category", "")), "solved")
    if not task.get("oracle"):
        report.verdict = "unchecked"
        report.problems.append("no oracle to replay")
        return report
    if "answer_contains" in task["success"]:
        report.verdict = "unchecked"
        report.problems.append(
            "success needs a final answer ('answer_contains'), which an oracle of calls cannot give"
        )
        return report
    turns = oracle_texts(task, env.max_turns)
    played, _ = play_turns(env, task["id"], turns)
    report.statuses = [info["status"] for _, info in played]
    if played and played[-1][1]["status"] == "success":
        if len(played) < len(turns):
            report.problems.append(f"solved after {len(played)} of the oracle's {len(turns)} turns")
        return report
    report.verdict = "failed"
    report.problems.append(_why_failed(task, turns, played))
    return report


def _why_failed(task: dict[str, Any], turns: list[str], played: list[tuple[str, dict[str, Any]]]) -> str:
    for k, (text, info) in enumerate(played, start=1):
        if info["status"] not in ("success", "tool_execution"):
            message = " ".join(m["content"] for m in info.get("tool_messages", []))
            if not is_conversation(task):
                return f"oracle call {k} ({info['calls'][0]['name']}): {info['status']}: {_snippet(message)}"
            if text == ORACLE_ANSWER:
                return (
                    f"oracle turn {k} (the final answer of user turn {info['user_turn'] + 1}): {info['status']}: "
                    "the success conditions do not hold"
                )
            return f"oracle turn {k} ({info['calls'][0]['name']}): {info['status']}: {_snippet(message)}"
    results = [m for _, info in played for m in info.get("tool_messages", [])]
    wanted = task["success"].get("tool")
    shown = [m for m in results if m.get("name") == wanted] if wanted else results
    last = f"; last result of {shown[-1]['name']!r}: {_snippet(shown[-1]['content'])}" if shown else ""
    return (
        f"the oracle's {len(played)} call(s) ran without error, but no result met the success conditions "
        f"{json.dumps(task['success'])}{last}"
    )


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET else text[: _SNIPPET - 3] + "..."


def check_tasks(
    source: str | Path | list[dict[str, Any]],
    server: Any = None,
    *,
    max_turns: int = 4,
    call_timeout: float = 10.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[TaskReport]:
    """Check every task of a JSONL file (or list of dicts) against ``server`` (as ``MCPGymEnv`` takes it).

    ``progress(done, total)`` is called after each task. Raises ``env.TaskError`` only when the file cannot be
    read or holds no task (and ``env.ServerStartError`` when the server cannot start); bad lines are ``broken``
    reports."""
    from env.mcp_env import MCPGymEnv

    if isinstance(source, (str, Path)):
        lines = task_lines(source)
    else:
        lines = []
        for i, task in enumerate(source):
            try:
                lines.append((f"task {i}", load_tasks([task])[0], None))
            except TaskError as exc:
                lines.append((f"task {i}", None, exc))
    if not lines:
        raise TaskError(f"{source if isinstance(source, (str, Path)) else 'the task list'} holds no tasks")
    valid = [(place, task) for place, task, error in lines if error is None]
    duplicated = duplicate_ids([t for _, t in valid], [p for p, _ in valid])
    reports = [
        TaskReport(place, None, "", "broken", [str(error).removeprefix(f"{place}: ")])
        for place, _, error in lines
        if error is not None
    ]
    reports += [
        TaskReport(place, task["id"], str(task.get("category", "")), "broken", [duplicated[place]])
        for place, task in valid
        if place in duplicated
    ]
    playable = [(place, task) for place, task in valid if place not in duplicated]
    env = MCPGymEnv(
        server=server, tasks=[t for _, t in playable], max_turns=max_turns, call_timeout=call_timeout
    )
    try:
        tools = {t["function"]["name"]: t["function"] for t in env.tools}
        for place, task in playable:
            problems = static_problems(task, tools, max_turns)
            if problems:
                report = TaskReport(place, task["id"], str(task.get("category", "")), "broken", problems)
            else:
                report = replay_oracle(env, task)
                report.place = place
            reports.append(report)
            if progress is not None:
                progress(len(reports), len(lines))
    finally:
        env.close()
    order = {place: k for k, (place, _, _) in enumerate(lines)}
    return sorted(reports, key=lambda r: order[r.place])


def summary_table(reports: list[TaskReport]) -> str:
    """Markdown table: one row per category and one for all, a column per verdict."""
    categories: dict[str, dict[str, int]] = {}
    for r in reports:
        row = categories.setdefault(r.category or "(none)", dict.fromkeys(VERDICTS, 0))
        row[r.verdict] += 1
    head = "| category | tasks | " + " | ".join(VERDICTS) + " |"
    rows = [head, "|" + "---|" * (2 + len(VERDICTS))]
    total = dict.fromkeys(VERDICTS, 0)
    for name, row in categories.items():
        rows.append(f"| {name} | {sum(row.values())} | " + " | ".join(str(row[v]) for v in VERDICTS) + " |")
        for v in VERDICTS:
            total[v] += row[v]
    rows.append(f"| **all** | {len(reports)} | " + " | ".join(str(total[v]) for v in VERDICTS) + " |")
    return "\n".join(rows)
