"""Rollouts: token in, token out; masks; rewards on the last action token; the template's own suffix ids."""

from __future__ import annotations

import contextlib
import json
import time
import warnings

import pytest
import torch
from transformers import AutoTokenizer

from env import EnvPool
from ppo.rollout import ChatFormat, collect_rollouts
from ppo.rollout import episodes as rollout
from ppo.rollout.generation import TurnSample

TASKS = [
    {
        "id": "calc-ok",
        "category": "math",
        "prompt": "Use the calculator to compute 6 * 7.",
        "success": {"tool": "calculator", "result_equals": "42"},
        "max_turns": 3,
    },
    {
        "id": "calc-two-turns",
        "category": "math",
        "prompt": "Use the calculator to compute 2 + 2.",
        "success": {"tool": "calculator", "result_equals": "4"},
        "max_turns": 3,
    },
]


def call(expression: str) -> str:
    body = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
    return f"<tool_call>\n{body}\n</tool_call>"


class ScriptedPolicy:
    """Stands in for the policy and its sampler: each context gets the next of its scripted turns."""

    def __init__(self, turns_by_prompt: dict[tuple[int, ...], list[list[int]]]):
        self.model = torch.nn.Linear(1, 1)
        self.turns = turns_by_prompt
        self.calls = 0

    def policy(self):
        return contextlib.nullcontext(self)

    def make_engine(self, model, **_kw):
        """Stands in for `ppo.rollout.engine.make_engine`: this object is the engine."""
        return self

    def sample(self, rows, contexts, **_kw):
        self.calls += 1
        tokens = [self.turns[self._key(c)].pop(0) for c in contexts]
        return TurnSample(tokens, [[-1.0] * len(t) for t in tokens])

    def close(self):
        pass

    def _key(self, context):
        for key in self.turns:
            if context[: len(key)] == list(key):
                return key
        raise AssertionError("unexpected context")


@pytest.fixture(scope="module")
def chat(small_tiny_dir):
    return ChatFormat(AutoTokenizer.from_pretrained(small_tiny_dir))


def test_suffix_ids_are_the_templates_rendering(chat):
    tool_messages = [
        {"role": "tool", "name": "calculator", "content": "42"},
        {"role": "tool", "content": "x"},
    ]
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "A"},
        *tool_messages,
    ]
    full = chat.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    head = chat.tokenizer.apply_chat_template(messages[:2], tokenize=False)
    eos = chat.tokenizer.convert_ids_to_tokens(chat.end_of_turn_id)
    cut = head.index("A" + eos) + len("A" + eos)
    assert chat.tokenizer.decode(chat.suffix_ids(tool_messages)) == full[cut:]
    assert "<tool_response>\n42\n</tool_response>" in full[cut:]


def test_episode_tokens_are_prompt_then_sampled_then_suffix(chat, monkeypatch):
    enc = chat.encode
    eot = chat.end_of_turn_id
    with EnvPool(2, tasks=TASKS) as pool:
        prompts = {}
        for (_obs, info), task in zip(pool.reset(task_ids=["calc-ok", "calc-two-turns"]), TASKS, strict=True):
            prompts[task["id"]] = chat.prompt_ids(info["messages"], info["tools"])
        turn_ok = [*enc(call("6 * 7")), eot]
        turn_bad = [*enc(call("2 +")), eot]  # a tool error: the episode goes on
        turn_unclosed = enc(call("2 + 2"))  # no end-of-turn token: ran out of max_new_tokens
        policy = ScriptedPolicy(
            {
                tuple(prompts["calc-ok"]): [turn_ok],
                tuple(prompts["calc-two-turns"]): [turn_bad, turn_unclosed],
            }
        )
        monkeypatch.setattr(rollout, "make_engine", policy.make_engine)
        batch = collect_rollouts(
            policy,
            chat,
            pool,
            ["calc-ok", "calc-two-turns"],
            max_new_tokens=200,
            max_context=4000,
            temperature=1.0,
        )
    first, second = batch.episodes
    assert first.statuses == ["success"] and first.success and first.terminated
    assert first.ids == prompts["calc-ok"] + turn_ok
    assert first.action_mask == [0] * len(prompts["calc-ok"]) + [1] * len(turn_ok)
    assert second.statuses == ["tool_error", "success"]
    suffix = chat.suffix_ids(second.messages[-3:-2])  # the tool message that answered the first turn
    expected = prompts["calc-two-turns"] + turn_bad + suffix + turn_unclosed
    assert second.ids == expected
    mask = (
        [0] * len(prompts["calc-two-turns"])
        + [1] * len(turn_bad)
        + [0] * len(suffix)
        + [1] * len(turn_unclosed)
    )
    assert second.action_mask == mask
    # each turn's reward sits on its last sampled token, nowhere else
    row = batch.scores[1]
    end_first = len(prompts["calc-two-turns"]) + len(turn_bad) - 1
    assert row[end_first] == pytest.approx(-0.5)
    assert row[len(expected) - 1] == pytest.approx(10.0)
    assert int((row != 0).sum()) == 2
    assert batch.scores[0, len(first.ids) - 1] == pytest.approx(10.0)
    # right padding: the shorter episode is padded with the pad id and masked out
    assert batch.attention_mask[0].sum() == len(first.ids)
    assert (batch.input_ids[0, len(first.ids) :] == chat.pad_id).all()
    assert batch.action_mask.sum() == len(turn_ok) + len(turn_bad) + len(turn_unclosed)


def test_episode_that_outgrows_the_context_is_cut_and_counted(chat, monkeypatch):
    with EnvPool(1, tasks=TASKS) as pool:
        _obs, info = pool.reset(task_ids=["calc-ok"])[0]
        prompt = chat.prompt_ids(info["messages"], info["tools"])
        policy = ScriptedPolicy({tuple(prompt): []})
        monkeypatch.setattr(rollout, "make_engine", policy.make_engine)
        monkeypatch.setattr(rollout, "_warned_prompt_cut", [])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch = collect_rollouts(
                policy,
                chat,
                pool,
                ["calc-ok"],
                max_new_tokens=50,
                max_context=len(prompt) + 10,
                temperature=1.0,
            )
    (episode,) = batch.episodes
    assert episode.cut and episode.truncated and not episode.statuses
    assert policy.calls == 0 and batch.action_mask.sum() == 0
    (warned,) = [str(w.message) for w in caught if "raise --max-context" in str(w.message)]
    assert "task 'calc-ok'" in warned and rollout._warned_prompt_cut == ["calc-ok"]


class SlowSecondTurn:
    """An engine whose first episode's turn ends at once and whose second keeps generating until the first
    episode's tool call has run to its end: possible only if tool calls start while generation goes on."""

    def __init__(self, pool, turns):
        self.pool, self.turns, self.waited = pool, turns, 0.0

    def make_engine(self, model, **_kw):
        return self

    def sample(self, rows, contexts, *, on_turn_end=None, **_kw):
        on_turn_end(0, self.turns[0])
        first = self.pool.envs[rows[0]]._episode
        start = time.monotonic()
        while not first.done:  # set when the env's step, tool call included, is over
            assert time.monotonic() - start < 30, "the first turn's tool call did not run during generation"
            time.sleep(0.005)
        self.waited = time.monotonic() - start
        on_turn_end(1, self.turns[1])
        return TurnSample(self.turns, [[-1.0] * len(t) for t in self.turns])

    def policy(self):
        return contextlib.nullcontext(self)

    def close(self):
        pass

    model = torch.nn.Linear(1, 1)


def test_tool_calls_start_while_other_turns_are_still_sampled(chat, monkeypatch):
    eot = chat.end_of_turn_id
    turns = [[*chat.encode(call("6 * 7")), eot], [*chat.encode(call("2 + 2")), eot]]
    with EnvPool(2, tasks=TASKS) as pool:
        engine = SlowSecondTurn(pool, turns)
        monkeypatch.setattr(rollout, "make_engine", engine.make_engine)
        batch = collect_rollouts(
            engine,
            chat,
            pool,
            ["calc-ok", "calc-two-turns"],
            max_new_tokens=64,
            max_context=4000,
            temperature=1.0,
        )
    assert [e.statuses for e in batch.episodes] == [["success"], ["success"]]
    assert all(e.success and e.terminated for e in batch.episodes)
