"""BFCL's multi-turn categories as MCP environments: ground-truth replay through MCPGymEnv, wrong calls that must
fail, isolation of concurrent episodes on every transport, and a training run end to end.

Needs the optional bfcl-eval package (installed without its dependencies; README, "BFCL"); skipped without it."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bfcl_eval")

from env import EnvPool, MCPGymEnv
from env.check import check_tasks
from mcp_mock import bfcl
from mcp_mock.bfcl.server import load_state
from mcp_mock.bfcl.suite import category_of

from .conftest import serve_http

ROOT = Path(__file__).resolve().parents[1]
# The entries whose ground truth the env refuses, because it checks arguments against BFCL's own function docs
# (BFCL's runner does not): close_ticket(ticket_id='ticket_001') where the doc says integer (the same entry in each
# multi-turn category); linear_regression_fit(y="data['future_sales']") where it says array; sort_list with
# strings where it says integers.
KNOWN_MISSES = {
    **{c: {f"{c}_173": "argument 'ticket_id' must be an integer"} for c in bfcl.MULTI_TURN_CATEGORIES},
    "parallel_multiple": {
        "parallel_multiple_21": "argument 'y' must be an array",
        "parallel_multiple_94": "argument 'elements.4' must be an integer",
    },
}


def call(name, **arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


@pytest.mark.parametrize("category", bfcl.CATEGORIES)
def test_ground_truth_replay_succeeds(category):
    server = bfcl.create_server(category if category in bfcl.AST_CATEGORIES else None)
    reports = check_tasks(bfcl.category_tasks(category), server)
    solved = sum(r.verdict == "solved" for r in reports)
    assert solved / len(reports) >= 0.98, f"{solved} of {len(reports)}"
    missed = {r.task_id: r.problems for r in reports if r.verdict != "solved"}
    expected = KNOWN_MISSES.get(category, {})
    assert set(missed) == set(expected), missed
    for task_id, reason in expected.items():
        assert reason in missed[task_id][0], missed[task_id]


def _task(entry="multi_turn_base_0"):
    """A copy of the task of one BFCL entry."""
    return copy.deepcopy(next(t for t in bfcl.category_tasks(category_of(entry)) if t["id"] == entry))


def _with_oracle(task, turn, calls, suffix):
    task["id"] += f"-{suffix}"
    task["oracle"][turn] = calls
    return task


def test_wrong_call_wrong_argument_and_missing_turn_fail():
    right = _task()
    first = right["oracle"][0]  # cd(folder='document'), mkdir(dir_name='temp'), mv(final_report.pdf -> temp)
    assert [c["name"] for c in first] == ["cd", "mkdir", "mv"]
    touch = {"name": "touch", "arguments": {"file_name": "temp"}}
    wrong_arg = {"name": "mkdir", "arguments": {"dir_name": "tmp"}}
    variants = [
        _with_oracle(_task(), 0, [first[0], touch, first[2]], "wrong-call"),
        _with_oracle(_task(), 0, [first[0], wrong_arg, first[2]], "wrong-argument"),
        _with_oracle(_task(), 1, [], "missing-turn"),
    ]
    reports = {r.task_id: r for r in check_tasks([right, *variants], bfcl.create_server(), max_turns=20)}
    assert reports["multi_turn_base_0"].verdict == "solved"
    # Each fails at the final answer of the user turn it spoiled: turn 1 (3 calls + answer), turn 2 (+ 1 answer).
    for task, played in zip(variants, (4, 4, 5), strict=True):
        report = reports[task["id"]]
        assert report.verdict == "failed", task["id"]
        assert len(report.statuses) == played and report.statuses[-1] == "structural_fail", report.statuses


def test_the_checker_reports_bfcl_error_types():
    state = load_state("multi_turn_base_0")
    assert state.verify()["error_type"] == "multi_turn:empty_turn_model_response"  # no call in turn 1
    state = load_state("multi_turn_base_0")
    state.run("cd", {"folder": "document"})
    state.run("mkdir", {"dir_name": "tmp"})
    assert state.verify()["error_type"] == "multi_turn:instance_state_mismatch"
    state = load_state("multi_turn_base_0")
    for c in _task()["oracle"][0]:
        text, failed = state.run(c["name"], c["arguments"])
        assert not failed, text
    assert state.verify() == {"valid": True}


def test_ast_wrong_value_wrong_function_extra_call_and_irrelevance_fail():
    right = _task("simple_python_0")  # calculate_triangle_area(base=10, height=5)
    assert right["oracle"] == [[{"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}}]]
    wrong_value = {**copy.deepcopy(right), "id": "wrong-value"}
    wrong_value["oracle"][0][0]["arguments"]["base"] = 11
    twice = {**copy.deepcopy(right), "id": "twice", "oracle": [right["oracle"][0] * 2], "max_turns": 3}
    none = {**copy.deepcopy(right), "id": "no-call", "oracle": [[]]}
    server = bfcl.create_server("simple_python")
    reports = {r.task_id: r for r in check_tasks([right, wrong_value, twice, none], server)}
    assert reports["simple_python_0"].verdict == "solved"
    for name in ("wrong-value", "twice", "no-call"):
        assert reports[name].verdict == "failed" and reports[name].statuses[-1] == "structural_fail", name
    irrelevant = _task("irrelevance_0")
    called = {**irrelevant, "id": "called", "oracle": [[{"name": "determine_body_mass_index", "arguments": {
        "weight": 70, "height": 1.8}}]], "max_turns": 2}  # fmt: skip
    reports = {r.task_id: r for r in check_tasks([irrelevant, called], bfcl.create_server("irrelevance"))}
    assert reports["irrelevance_0"].verdict == "solved" and reports["called"].verdict == "failed"


def test_ast_functions_defined_twice_are_served_under_an_alias():
    tasks = bfcl.category_tasks("simple_python")
    aliased = [t for t in tasks if any("__" in name for name in t["tools"])]
    assert len(aliased) == 30  # 27 names that entries of the category define differently
    task = aliased[0]
    alias = next(name for name in task["tools"] if "__" in name)
    state = load_state(task["id"])
    state.run(alias, task["oracle"][0][0]["arguments"])
    assert list(state.calls[0]) == [alias.split("__")[0]]  # the checker sees BFCL's name
    assert state.verify() == {"valid": True}


def test_backend_errors_are_tool_errors_and_other_backends_are_hidden():
    environment = MCPGymEnv(bfcl.create_server(), [_task()], max_turns=20)
    try:
        environment.reset(options={"task_id": "multi_turn_base_0"})
        _, reward, _, _, info = environment.step(call("cd", folder="nowhere"))
        assert (info["status"], reward) == ("tool_error", -0.5)
        assert "No such file or directory" in info["tool_messages"][0]["content"]
        _, _, _, _, info = environment.step(
            call("get_stock_info", symbol="AAPL")
        )  # TradingBot: not this entry's
        assert info["status"] == "structural_fail"
        assert "bfcl_verify_turn" not in {t["function"]["name"] for t in info["tools"]}
    finally:
        environment.close()


@pytest.fixture(scope="module")
def bfcl_http_url():
    yield from serve_http("mcp_mock.bfcl")


@pytest.mark.parametrize("transport", ["inprocess", "stdio", "http"])
def test_concurrent_episodes_of_one_task_are_isolated(transport, request):
    server = {
        "inprocess": None,
        "stdio": f"{sys.executable} -m mcp_mock.bfcl",
        "http": request.getfixturevalue("bfcl_http_url") if transport == "http" else None,
    }[transport]
    task = _task()
    if transport == "inprocess":  # two envs on one session: only the episode keys keep them apart
        shared = bfcl.create_server()
        first = MCPGymEnv(shared, [task], max_turns=20)
        envs = [first, MCPGymEnv(shared, [task], max_turns=20, connection=first.connection)]
        assert first.isolation == "episode-key"
    else:
        pool = EnvPool(2, server=server, tasks=[task], max_turns=20)
        envs = pool.envs
    try:
        for environment in envs:
            environment.reset(options={"task_id": task["id"]})
        envs[0].step(call("cd", folder="document"))
        envs[0].step(call("mkdir", dir_name="only_in_episode_0"))
        envs[1].step(call("cd", folder="document"))
        listings = [environment.step(call("ls"))[4]["tool_messages"][0]["content"] for environment in envs]
        assert "only_in_episode_0" in listings[0]
        assert "only_in_episode_0" not in listings[1] and "final_report.pdf" in listings[1]
    finally:
        if transport == "inprocess":
            envs[1].close()
            envs[0].close()
        else:
            pool.close()


def test_train_runs_two_iterations_on_bfcl(small_tiny_dir, tmp_path):
    """Plumbing only: the small model writes nonsense, but rollouts, verification and the update all run."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ppo.train", "--model", str(small_tiny_dir), "--tasks", "bfcl:multi_turn_base",
           "--iterations", "2", "--output-dir", str(out), "--no-warmstart", "--num-episodes", "4",
           "--minibatch-size", "4", "--micro-batch-size", "2", "--max-new-tokens", "12", "--max-context", "8192",
           "--ppo-epochs", "1", "--optimizer", "adamw"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [0, 1]
    assert lines[-1]["charts/episodes"] == 4 and lines[-1]["perf/update_tokens"] > 4 * 2000


def test_evaluate_reports_bfcl_categories(small_tiny_dir, tmp_path):
    from ppo import evaluate

    result = evaluate.main(["--model", str(small_tiny_dir), "--tasks", "bfcl:parallel", "--limit", "3",
                            "--max-context", "2048", "--max-new-tokens", "8", "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert (
        list(result["per_category"]) == ["parallel"] and result["per_category"]["parallel"]["episodes"] == 3
    )
    assert result["split"] == "bfcl:parallel"
    assert json.loads((tmp_path / "r.json").read_text())["episodes"] == 3
