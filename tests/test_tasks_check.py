"""`python -m ppo.tasks check`: each kind of mistake in a task file gets its own diagnosis; the bundled suites pass."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import mcp_mock
from env.check import check_tasks, summary_table
from ppo.tasks import main as tasks_main


def _task(task_id: str, **fields) -> dict:
    task = {
        "id": task_id,
        "category": "math",
        "prompt": "Use the calculator to compute 2 + 3.",
        "success": {"tool": "calculator", "result_equals": "5"},
        "oracle": [{"name": "calculator", "arguments": {"expression": "2 + 3"}}],
    }
    task.update(fields)
    return task


SUITES = Path(mcp_mock.__file__).parent / "tasks"

# (task id, line of the file, expected verdict, a piece of the expected reason)
CASES = [
    ("good", _task("good"), "solved", None),
    ("no-json", '{"id": "no-json", "prompt": ', "broken", "not valid JSON"),
    ("no-success", {"id": "no-success", "prompt": "p"}, "broken", "missing key 'success'"),
    ("dup", _task("good"), "broken", "duplicate task id 'good'"),
    (
        "unknown-tool",
        _task("unknown-tool", oracle=[{"name": "calc", "arguments": {}}]),
        "broken",
        "unknown tool 'calc'",
    ),
    (
        "bad-args",
        _task("bad-args", oracle=[{"name": "calculator", "arguments": {"expression": 5}}]),
        "broken",
        "argument 'expression' must be a string",
    ),
    (
        "success-tool",
        _task("success-tool", success={"tool": "abacus", "result_equals": "5"}),
        "broken",
        "success names tool 'abacus'",
    ),
    (
        "probe-tool",
        _task(
            "probe-tool",
            success={"probe": {"name": "read_row", "arguments": {}, "result_contains": "x"}},
        ),
        "broken",
        "success probe: unknown tool 'read_row'",
    ),
    (
        "too-long",
        _task("too-long", max_turns=1, oracle=[{"name": "calculator", "arguments": {"expression": "1"}}] * 2),
        "broken",
        "needs 2 turns",
    ),
    (
        "tool-error",
        _task("tool-error", oracle=[{"name": "calculator", "arguments": {"expression": "2 +"}}]),
        "failed",
        "oracle call 1 (calculator): tool_error",
    ),
    (
        "wrong-result",
        _task("wrong-result", success={"tool": "calculator", "result_equals": "6"}),
        "failed",
        "no result met the success conditions",
    ),
    ("null-turns", _task("null-turns", max_turns=None), "broken", "'max_turns' must be a positive integer"),
    ("no-oracle", _task("no-oracle", oracle=None), "unchecked", "no oracle"),
    (
        "answer",
        _task("answer", success={"answer_contains": "5"}),
        "unchecked",
        "needs a final answer",
    ),
]


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tasks") / "mixed.jsonl"
    lines = []
    for _, task, _, _ in CASES:
        if isinstance(task, dict):
            task = {k: v for k, v in task.items() if v is not None or k == "max_turns"}
            lines.append(json.dumps(task))
        else:
            lines.append(task)
    path.write_text("\n".join(lines) + "\n\n")  # a blank line is skipped, not a task
    return path


def test_each_mistake_gets_its_diagnosis(task_file):
    reports = check_tasks(task_file)
    assert [r.place for r in reports] == [f"mixed.jsonl line {n}" for n in range(1, len(CASES) + 1)]
    for report, (name, _, verdict, reason) in zip(reports, CASES, strict=True):
        assert report.verdict == verdict, (name, report)
        if reason is None:
            assert report.problems == [], (name, report)
        else:
            assert any(reason in p for p in report.problems), (name, report.problems)
    assert reports[0].statuses == ["success"]
    table = summary_table(reports)
    assert "| **all** | 14 | 1 | 2 | 9 | 2 |" in table


def test_cli_exit_status_and_json(task_file, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert tasks_main(["check", str(task_file), "--quiet", "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "failed: mixed.jsonl line 10 tool-error: oracle call 1 (calculator): tool_error" in printed
    assert "3 of 14 tasks pass; 11 fail the check" in printed
    saved = json.loads(out.read_text())
    assert [r["verdict"] for r in saved] == [c[2] for c in CASES]


def test_cli_refuses_what_it_cannot_read(tmp_path, capsys):
    assert tasks_main(["check", str(tmp_path / "missing.jsonl"), "--quiet"]) == 2
    assert "cannot read task file" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert tasks_main(["check", str(empty), "--quiet"]) == 2
    assert "holds no tasks" in capsys.readouterr().err


@pytest.mark.parametrize("split", ["val", "test"])
def test_bundled_suites_pass(split, capsys):
    assert tasks_main(["check", str(SUITES / f"{split}.jsonl"), "--quiet"]) == 0
    assert "110 of 110 tasks pass" in capsys.readouterr().out


def test_bundled_suite_passes_over_stdio(tmp_path):
    """The same oracles replayed on the mock as a separate process: the check talks to any server."""
    path = tmp_path / "few.jsonl"
    path.write_text("".join((SUITES / "val.jsonl").read_text().splitlines(keepends=True)[:12]))
    reports = check_tasks(path, f"{sys.executable} -m mcp_mock")
    assert {r.verdict for r in reports} == {"solved"}, [r for r in reports if r.verdict != "solved"]


def test_train_with_check_tasks_stops_before_the_model_loads(task_file, tmp_path):
    from env import TaskError
    from ppo import train
    from ppo.infra.config import Config

    out = tmp_path / "run"
    with pytest.raises(
        TaskError, match=r"--check-tasks: 11 of 14 tasks fail the check \(broken: mixed.jsonl line 2"
    ):
        train.main(Config(output_dir=str(out), tasks=str(task_file), check_tasks=True))
    assert not out.exists()


def test_train_check_names_the_command_that_shows_every_failure(task_file, tmp_path):
    from env import TaskError
    from ppo import train
    from ppo.infra.config import Config

    with pytest.raises(TaskError) as err:
        train.main(
            Config(output_dir=str(tmp_path / "run"), tasks=str(task_file), check_tasks=True, max_turns=3)
        )
    assert f"See them all with: python -m ppo.tasks check {task_file} --max-turns 3" in str(err.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TaskError, match="holds no tasks"):
        train.main(Config(output_dir=str(tmp_path / "run2"), tasks=str(empty), check_tasks=True))
    with pytest.raises(TaskError, match="the task list holds no tasks"):
        check_tasks([])
