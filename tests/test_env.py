"""MCPGymEnv against an in-process test server: statuses and rewards, episode guards, gymnasium API."""

import sys
from pathlib import Path

import gymnasium
import pytest
from gymnasium.utils.env_checker import check_env

import env
from env import STATUSES, MCPGymEnv, RewardConfig

sys.path.insert(0, str(Path(__file__).parent / "servers"))
from echo_server import build_server

TASKS = [
    {"id": "add", "prompt": "Add 2 and 3.", "success": {"tool": "add", "result_number": 5}},
    {"id": "greet", "prompt": "Say hello.", "success": {"answer_contains": "hello"}},
    {
        "id": "note",
        "prompt": "Store v under k.",
        "success": {"probe": {"name": "read_note", "arguments": {"key": "k"}, "result_contains": "v"}},
        "max_turns": 2,
    },
    {
        "id": "echo-then-say",
        "prompt": "Echo x, then say done.",
        "success": {"tool": "echo", "answer_contains": "done"},
    },
]


def call(name, **arguments):
    import json

    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


@pytest.fixture
def mcp_env():
    environment = MCPGymEnv(build_server(), TASKS, max_turns=3)
    yield environment
    environment.close()


def start(environment, task_id):
    return environment.reset(options={"task_id": task_id})


def test_reset_gives_prompt_messages_and_tools(mcp_env):
    obs, info = start(mcp_env, "add")
    assert obs == "Add 2 and 3."
    assert info["messages"] == [{"role": "user", "content": "Add 2 and 3."}]
    assert info["task_id"] == "add" and info["task"] == TASKS[0]
    add = next(t for t in info["tools"] if t["function"]["name"] == "add")
    assert add["type"] == "function" and add["function"]["description"] == "Add two numbers."
    assert add["function"]["parameters"]["required"] == ["a", "b"]


@pytest.mark.parametrize(
    ("task_id", "text", "status", "reward", "terminated"),
    [
        ("add", call("add", a=2, b=3), "success", 10.0, True),
        ("add", call("add", a=1, b=1), "tool_execution", 0.0, False),
        ("add", call("add", a=1, b="ten"), "tool_error", -0.5, False),
        ("add", call("fail", message="boom"), "tool_error", -0.5, False),
        ("add", '<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>', "invalid_json", -0.8, False),
        ("add", call("multiply", a=1, b=2), "structural_fail", -1.0, False),
        ("add", "The answer is 5.", "structural_fail", -1.0, True),
        ("greet", "Well, hello there!", "success", 10.0, True),
    ],
)
def test_each_status_pays_its_reward(mcp_env, task_id, text, status, reward, terminated):
    start(mcp_env, task_id)
    _, got_reward, got_terminated, truncated, info = mcp_env.step(text)
    assert info["status"] == status
    assert got_reward == reward
    assert (got_terminated, truncated) == (terminated, False)


def test_tool_messages_and_observation(mcp_env):
    start(mcp_env, "add")
    text = call("add", a=1, b="ten") + call("echo", text="hi")
    obs, _, _, _, info = mcp_env.step(text)
    assert info["tool_messages"] == [
        {
            "role": "tool",
            "name": "add",
            "content": "invalid arguments for tool 'add': argument 'b' must be a number, got 'ten'",
        },
        {"role": "tool", "name": "echo", "content": "hi"},
    ]
    assert obs == info["tool_messages"][0]["content"] + "\nhi"
    assert info["messages"][1] == {"role": "assistant", "content": text}
    assert info["messages"][2:] == info["tool_messages"]
    assert [c["name"] for c in info["calls"]] == ["add", "echo"] and info["turn"] == 1


def test_unknown_tool_lists_the_real_ones(mcp_env):
    start(mcp_env, "add")
    obs, *_ = mcp_env.step(call("multiply", a=1))
    assert (
        obs
        == "unknown tool 'multiply'; available tools: echo, add, fail, big, slow, write_note, read_note, pid"
    )


def test_most_severe_status_wins_unless_the_task_completes(mcp_env):
    start(mcp_env, "add")
    bad_json = "<tool_call>{nope}</tool_call>"
    _, reward, *_, info = mcp_env.step(call("fail", message="x") + bad_json + call("echo", text="y"))
    assert (info["status"], reward) == ("invalid_json", -0.8)
    _, reward, terminated, _, info = mcp_env.step(bad_json + call("add", a=2, b=3))
    assert (info["status"], reward, terminated) == ("success", 10.0, True)


def test_all_invalid_calls_get_each_error_back(mcp_env):
    start(mcp_env, "add")
    info = mcp_env.step("<tool_call>{</tool_call><tool_call>[1]</tool_call>")[4]
    assert [m["name"] for m in info["tool_messages"]] == [None, None]
    assert "Expecting property name" in info["tool_messages"][0]["content"]
    assert "expected a JSON object, got an array" in info["tool_messages"][1]["content"]


def test_probe_checks_server_state_after_the_turn(mcp_env):
    start(mcp_env, "note")
    assert mcp_env.step(call("write_note", key="k", value="other"))[4]["status"] == "tool_execution"
    _, reward, terminated, _, info = mcp_env.step(call("write_note", key="k", value="v"))
    assert (info["status"], reward, terminated) == ("success", 10.0, True)


def test_call_condition_then_final_answer(mcp_env):
    start(mcp_env, "echo-then-say")
    assert mcp_env.step(call("echo", text="x"))[4]["status"] == "tool_execution"
    _, reward, terminated, _, info = mcp_env.step("All DONE.")
    assert (info["status"], reward, terminated) == ("success", 10.0, True)


def test_turn_limit_truncates(mcp_env):
    start(mcp_env, "note")  # the task's own max_turns=2 overrides the env's 3
    assert mcp_env.step(call("echo", text="a"))[2:4] == (False, False)
    _, _, terminated, truncated, info = mcp_env.step(call("echo", text="b"))
    assert (terminated, truncated, info["turn"]) == (False, True, 2)
    with pytest.raises(RuntimeError, match="after the episode ended"):
        mcp_env.step("more")


def test_consecutive_invalid_turns_terminate():
    environment = MCPGymEnv(build_server(), TASKS, max_turns=10, max_invalid_turns=2)
    try:
        start(environment, "add")
        assert environment.step(call("nope"))[2] is False
        assert environment.step(call("echo", text="fine"))[2] is False  # a clean turn resets the streak
        assert environment.step("<tool_call>{bad</tool_call>")[2] is False
        _, reward, terminated, truncated, info = environment.step(call("nope"))
        assert (info["status"], reward, terminated, truncated) == ("structural_fail", -1.0, True, False)
    finally:
        environment.close()


def test_calls_beyond_the_cap_are_not_run(mcp_env):
    start(mcp_env, "add")
    _, reward, _, _, info = mcp_env.step(call("echo", text="e") * 6)
    assert [m["content"] for m in info["tool_messages"]] == ["e"] * 4 + [
        "2 tool call(s) not run: at most 4 calls are run per turn"
    ]
    assert (info["status"], reward) == ("structural_fail", -1.0)


def test_long_outputs_are_cut_in_the_middle(mcp_env):
    start(mcp_env, "add")
    obs, *_ = mcp_env.step(call("big", n=5000))
    assert obs == "a" * 1000 + "\n... [3000 characters cut] ...\n" + "a" * 999 + "z"


def test_custom_rewards_and_unknown_task_id():
    environment = MCPGymEnv(build_server(), TASKS, reward=RewardConfig(success=1.0, structural_fail=-2.0))
    try:
        start(environment, "add")
        assert environment.step("no call")[1] == -2.0
        with pytest.raises(ValueError, match="unknown task id 'missing'"):
            start(environment, "missing")
    finally:
        environment.close()


def test_misuse_raises_clearly():
    environment = MCPGymEnv(build_server(), TASKS)
    try:
        with pytest.raises(RuntimeError, match="before reset"):
            environment.step("hi")
        start(environment, "add")
        with pytest.raises(TypeError, match="takes the assistant turn as a str"):
            environment.step(b"bytes")
    finally:
        environment.close()


def test_seeded_reset_is_reproducible(mcp_env):
    first = [mcp_env.reset(seed=7)[1]["task_id"]] + [mcp_env.reset()[1]["task_id"] for _ in range(5)]
    again = [mcp_env.reset(seed=7)[1]["task_id"]] + [mcp_env.reset()[1]["task_id"] for _ in range(5)]
    assert first == again and len(set(first)) > 1


def test_check_env_passes(mcp_env):
    check_env(mcp_env, skip_render_check=True)


def test_gymnasium_make_and_text_spaces():
    assert "MCPGym-v0" in gymnasium.registry
    made = gymnasium.make("MCPGym-v0", server=build_server(), tasks=TASKS)
    try:
        obs, _ = made.reset(seed=0)
        assert obs in made.observation_space
        assert '{"name": "x", "arguments": {}} ü 中 🙂\n' in made.action_space
        assert made.step(call("echo", text="é"))[4]["status"] in STATUSES
    finally:
        made.close()


def test_package_exports():
    assert env.STATUSES == ("success", "tool_execution", "tool_error", "invalid_json", "structural_fail")
    assert callable(env.EnvPool) and issubclass(env.ServerStartError, RuntimeError)


def test_added_tasks_play_by_id_and_a_taken_id_is_refused(mcp_env):
    added = mcp_env.add_tasks(
        [{"id": "add-7", "prompt": "Add 3 and 4.", "success": {"tool": "add", "result_number": 7}}]
    )
    assert [t["id"] for t in added] == ["add-7"] and len(mcp_env.tasks) == len(TASKS) + 1
    start(mcp_env, "add-7")
    _obs, reward, terminated, _truncated, info = mcp_env.step(call("add", a=3, b=4))
    assert info["status"] == "success" and terminated and reward == 10.0
    with pytest.raises(env.TaskError, match="'add' is already one of this env's tasks"):
        mcp_env.add_tasks([{"id": "add", "prompt": "p", "success": {"tool": "add"}}])
    with pytest.raises(env.TaskError, match="missing key 'prompt'"):
        mcp_env.add_tasks([{"id": "x", "success": {"tool": "add"}}])
