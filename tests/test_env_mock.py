"""Every task of the bundled mock suites is solvable: its oracle, replayed through MCPGymEnv, succeeds."""

import json

import gymnasium
import pytest

from env import MCPGymEnv, load_tasks

mcp_mock = pytest.importorskip("mcp_mock")


def oracle_turns(task):
    """The oracle as assistant turns: one call per turn, then a final answer if the task wants one."""
    turns = [f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in task.get("oracle", [])]
    answer = task["success"].get("answer_contains")
    if answer is not None:
        turns.append("The answer: " + (answer if isinstance(answer, str) else ", ".join(answer)))
    return turns


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_oracle_reaches_success(split):
    tasks = load_tasks(list(mcp_mock.load_tasks(split)))
    environment = MCPGymEnv(None, tasks, max_turns=64)
    failures = []
    try:
        for task in tasks:
            environment.reset(options={"task_id": task["id"]})
            status, messages = None, []
            for text in oracle_turns(task):
                _, _, terminated, truncated, info = environment.step(text)
                status, messages = info["status"], info["tool_messages"]
                if terminated or truncated:
                    break
            if status != "success":
                failures.append((task["id"], status, [m["content"][:200] for m in messages]))
    finally:
        environment.close()
    assert not failures, f"{len(failures)} of {len(tasks)} oracles fail, e.g. {failures[:3]}"


def test_defaults_are_the_mock_server_and_train_split():
    environment = gymnasium.make("MCPGym-v0")
    try:
        _, info = environment.reset(seed=0)
        assert info["task_id"] in {t["id"] for t in mcp_mock.load_tasks("train")}
        assert info["tools"]
    finally:
        environment.close()
