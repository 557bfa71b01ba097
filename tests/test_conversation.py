"""Conversations in MCPGymEnv: several user turns, a task's subset of the tools, setup calls the model never
sees; their oracle replay in env.check and their layout in the rollout."""

from __future__ import annotations

import json

import pytest
from mcp.server.mcpserver import Context, MCPServer

from env import MCPGymEnv, TaskError, load_tasks
from env.check import ORACLE_ANSWER, check_tasks, oracle_texts


def stack_server() -> MCPServer:
    """``push`` onto a stack; ``start`` (setup) sets the goal of each user turn; ``check`` (the probe) compares the
    stack with the next goal. State lives in the client's lifespan (in process: one per session)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_):
        yield {"stack": [], "goals": [], "checked": 0}

    server = MCPServer("stack", lifespan=lifespan)

    def state(ctx: Context) -> dict:
        return ctx.request_context.lifespan_context

    @server.tool()
    def start(goals: list[list[str]], ctx: Context) -> str:
        """Set up the episode."""
        state(ctx).update(stack=[], goals=goals, checked=0)
        return "ready"

    @server.tool()
    def push(item: str, ctx: Context) -> str:
        """Push an item."""
        state(ctx)["stack"].append(item)
        return f"stack: {state(ctx)['stack']}"

    @server.tool()
    def peek(ctx: Context) -> str:
        """Show the stack."""
        return str(state(ctx)["stack"])

    @server.tool()
    def check(ctx: Context) -> str:
        """Compare the stack with the next goal."""
        s = state(ctx)
        goal = s["goals"][s["checked"]]
        s["checked"] += 1
        return "ok" if s["stack"] == goal else f"stack {s['stack']} is not {goal}"

    return server


TASK = {
    "id": "two-pushes",
    "prompt": ["Push a.", "Now push b."],
    "tools": ["push", "peek"],
    "setup": [{"name": "start", "arguments": {"goals": [["a"], ["a", "b"]]}}],
    "success": {"probe": {"name": "check", "arguments": {}, "result_contains": "ok"}},
    "oracle": [
        [{"name": "push", "arguments": {"item": "a"}}],
        [{"name": "push", "arguments": {"item": "b"}}],
    ],
    "max_turns": 3,
}


def call(name, **arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


@pytest.fixture
def conv_env():
    environment = MCPGymEnv(stack_server(), [TASK], max_turns=4)
    yield environment
    environment.close()


def test_user_turns_arrive_when_each_is_verified(conv_env):
    obs, info = conv_env.reset(options={"task_id": "two-pushes"})
    assert obs == "Push a." and info["user_turn"] == 0
    assert [t["function"]["name"] for t in info["tools"]] == ["push", "peek"]  # start and check stay hidden
    _, reward, terminated, _, info = conv_env.step(call("push", item="a"))
    assert (info["status"], reward, terminated) == ("tool_execution", 0.0, False)
    obs, reward, terminated, truncated, info = conv_env.step("Pushed.")
    assert (info["status"], reward, terminated, truncated) == ("tool_execution", 0.0, False, False)
    assert obs == "Now push b." and info["user_turn"] == 1
    assert (
        info["new_messages"] == [{"role": "user", "content": "Now push b."}] and info["tool_messages"] == []
    )
    assert info["messages"][-2:] == [{"role": "assistant", "content": "Pushed."}, info["new_messages"][0]]
    conv_env.step(call("push", item="b"))
    _, reward, terminated, _, info = conv_env.step("Done.")
    assert (info["status"], reward, terminated) == ("success", 10.0, True)


def test_a_user_turn_that_fails_its_check_ends_the_episode(conv_env):
    conv_env.reset(options={"task_id": "two-pushes"})
    conv_env.step(call("push", item="z"))
    _, reward, terminated, _, info = conv_env.step("Pushed.")
    assert (info["status"], reward, terminated, info["user_turn"]) == ("structural_fail", -1.0, True, 0)
    conv_env.reset(options={"task_id": "two-pushes"})  # a missing turn: no call at all
    _, _, terminated, _, info = conv_env.step("Nothing to do.")
    assert info["status"] == "structural_fail" and terminated


def test_calls_never_complete_a_user_turn_and_max_turns_counts_per_user_turn(conv_env):
    conv_env.reset(options={"task_id": "two-pushes"})
    for k in range(3):  # the goal of turn 1 holds after the first push, but only a final answer ends the turn
        _, _, terminated, truncated, info = conv_env.step(call("peek") if k else call("push", item="a"))
        assert info["status"] == "tool_execution" and not terminated
    assert truncated  # 3 assistant turns in user turn 1 (max_turns 3)
    conv_env.reset(options={"task_id": "two-pushes"})
    conv_env.step(call("push", item="a"))
    conv_env.step("ok")
    for _ in range(2):  # user turn 2 starts its own count: 1 (+1 above) of 3
        _, _, _, truncated, _ = conv_env.step(call("peek"))
        assert not truncated


def test_hidden_tools_are_unknown_to_the_model_and_setup_ran(conv_env):
    conv_env.reset(options={"task_id": "two-pushes"})
    _, _, _, _, info = conv_env.step(call("check"))
    assert info["status"] == "structural_fail"
    assert "unknown tool 'check'; available tools: push, peek" in info["tool_messages"][0]["content"]
    _, _, _, _, info = conv_env.step(call("peek"))
    assert info["tool_messages"][0]["content"] == "[]"  # start() emptied the stack at reset


def test_setup_failure_and_unknown_task_tools_are_task_errors():
    bad_setup = {**TASK, "id": "bad", "setup": [{"name": "start", "arguments": {}}]}
    environment = MCPGymEnv(stack_server(), [bad_setup, {**TASK, "id": "ghost", "tools": ["push", "pop"]}])
    try:
        with pytest.raises(TaskError, match="task 'bad': setup call 'start' failed"):
            environment.reset(options={"task_id": "bad"})
        with pytest.raises(TaskError, match="task 'ghost' lists tools the server does not have: pop"):
            environment.reset(options={"task_id": "ghost"})
    finally:
        environment.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": ["a", ""]}, "missing key 'prompt'"),
        ({"prompt": []}, "missing key 'prompt'"),
        ({"oracle": [[]]}, "list of calls per user turn"),
        ({"oracle": [[{"name": "push"}], []]}, "'oracle' must be a list"),
        ({"tools": "push"}, "'tools' must be a list of distinct tool names"),
        ({"tools": ["push", "push"]}, "'tools' must be a list of distinct tool names"),
        ({"setup": [{"arguments": {}}]}, "'setup' must be a list"),
    ],
)
def test_conversation_task_validation(change, message):
    with pytest.raises(TaskError, match=message):
        load_tasks([{**TASK, **change}])


def test_oracle_replay_of_conversations():
    assert oracle_texts(TASK, 4) == [
        call("push", item="a"),
        ORACLE_ANSWER,
        call("push", item="b"),
        ORACLE_ANSWER,
    ]
    many = {
        **TASK,
        "oracle": [[{"name": "push", "arguments": {"item": c}} for c in "abcde"], []],
        "max_turns": 3,
    }
    texts = oracle_texts(many, 4)  # 5 calls in 2 turns (3 turns less the answer): as few calls a turn as fit
    assert [t.count("<tool_call>") for t in texts] == [3, 2, 0, 0] and texts[2:] == [ORACLE_ANSWER] * 2
    wrong = {**TASK, "id": "wrong", "oracle": [[{"name": "push", "arguments": {"item": "a"}}], []]}
    hidden = {**TASK, "id": "hidden", "oracle": [[{"name": "check", "arguments": {}}], []]}
    reports = {r.task_id: r for r in check_tasks([TASK, wrong, hidden], stack_server())}
    assert reports["two-pushes"].verdict == "solved", reports["two-pushes"].problems
    assert reports["two-pushes"].statuses == ["tool_execution", "tool_execution", "tool_execution", "success"]
    assert reports["wrong"].verdict == "failed"
    assert "the final answer of user turn 2): structural_fail" in reports["wrong"].problems[0]
    assert reports["hidden"].verdict == "broken" and "unknown tool 'check'" in reports["hidden"].problems[0]


def test_rollout_layout_of_a_next_user_turn(small_tiny_dir):
    """The suffix after an assistant turn that a user message follows is what the template renders there."""
    from transformers import AutoTokenizer

    from ppo.rollout import ChatFormat

    chat = ChatFormat(AutoTokenizer.from_pretrained(small_tiny_dir))
    messages = [{"role": "user", "content": "Push a."}, {"role": "assistant", "content": "Pushed."}]
    following = {"role": "user", "content": "Now push b."}
    full = chat.render_prompt([*messages, following], None)
    cut = full.index("Pushed.<|im_end|>") + len("Pushed.<|im_end|>")  # the turn's end-of-turn token ends it
    assert chat.tokenizer.decode(chat.suffix_ids([following])) == full[cut:]
    assert "<|im_start|>user\nNow push b.<|im_end|>" in full[cut:]
