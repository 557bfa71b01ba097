"""Hostile turns: whatever the model writes, step() returns a valid status and never raises."""

import json
import random
import sys
from pathlib import Path

import pytest

from env import STATUSES, MCPGymEnv, RewardConfig

sys.path.insert(0, str(Path(__file__).parent / "servers"))
from echo_server import build_server

TASKS = [{"id": "add", "prompt": "Add 2 and 3.", "success": {"tool": "add", "result_number": 5}}]
NAMES = ["add", "echo", "fail", "big", "nope", "", "ADD", "add\x00", "🙂", "a" * 300]


def _nested(depth):
    return "[" * depth + "]" * depth


def _call_body(rng):
    """A call object with plausible and implausible names and argument values."""
    value = rng.choice(
        [1, -0.0, 1e308, "ten", None, True, [], {}, {"a": [1, {"b": "c"}]}, "x" * 5000, "\ud800"]
    )
    arguments = rng.choice([{"a": value, "b": 2}, {"text": value}, {"n": value}, value, {}])
    obj = {"name": rng.choice([*NAMES, 3, None]), "arguments": arguments}
    if rng.random() < 0.2:
        del obj["arguments"]
    return json.dumps(obj)


def hostile_turn(rng):
    """One of many kinds of garbage a policy can emit."""
    kind = rng.randrange(13)
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(200))).decode("latin-1")
    if kind == 1:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(200))).decode(
            "utf-8", errors="surrogateescape"
        )
    if kind == 2:
        return rng.choice(["x", "<tool_call>", "</tool_call>", "{"]) * rng.randrange(1, 50000)
    if kind == 3:
        return f"<tool_call>{_nested(rng.randrange(500, 20000))}</tool_call>"
    if kind == 4:
        depth = rng.randrange(10, 3000)
        return '<tool_call>{"name": "echo", "arguments": {"text": ' + _nested(depth) + "}}</tool_call>"
    if kind == 5:
        return (
            "".join(chr(rng.randrange(0x20, 0x10FFFF)) for _ in range(rng.randrange(100)))
            .encode("utf-8", "surrogatepass")
            .decode("utf-8", "replace")
        )
    if kind == 6:
        return "".join(f"<tool_call>{_call_body(rng)}</tool_call>" for _ in range(rng.randrange(1, 6)))
    if kind == 7:
        return '<tool_call>{"name": "echo", "arguments": {}}</tool_call>' * rng.randrange(100, 3000)
    if kind == 8:
        return (
            f"<think>{_call_body(rng)}"
            + rng.choice(["", "</think>", "</think><tool_call>"])
            + _call_body(rng)
        )
    if kind == 9:
        return "<tool_call>" + _call_body(rng)[: rng.randrange(40)]
    if kind == 10:
        return rng.choice(["", " ", "\n", "\x00", "</think>", "<think>", "<tool_call></tool_call>", "null"])
    if kind == 11:
        return f"<tool_call>{_call_body(rng)}</tool_call>" + rng.choice(["", "<tool_call>", "tail"])
    text = "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(50)))
    return "<tool_call>" + json.dumps({"name": "echo", "arguments": {"text": text}}) + "</tool_call>"


@pytest.mark.slow
def test_two_thousand_hostile_turns_never_raise():
    rng = random.Random(1234)
    config = RewardConfig()
    environment = MCPGymEnv(build_server(), TASKS, max_turns=3, call_timeout=5.0)
    seen = set()
    try:
        done = True
        for _ in range(2000):
            if done:
                environment.reset(seed=rng.randrange(1000))
            obs, reward, terminated, truncated, info = environment.step(hostile_turn(rng))
            assert info["status"] in STATUSES and reward == config.reward(info["status"])
            assert isinstance(obs, str) and obs in environment.observation_space
            assert len(info["tool_messages"]) <= environment.max_calls_per_turn + 1
            seen.add(info["status"])
            done = terminated or truncated
    finally:
        environment.close()
    # The generator reaches every failure status (success needs a sensible call, which is fine to miss).
    assert {"tool_execution", "tool_error", "invalid_json", "structural_fail"} <= seen
