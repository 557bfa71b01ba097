"""Batched multi-turn rollouts: a batch of MCP episodes played by the policy, returned as token tensors.

Letters: B episodes (rows), T token positions.

Token in, token out: an episode is one growing list of token ids. The prompt is rendered once with
the chat template; each assistant turn appends exactly the ids the policy sampled (never re-tokenized text); each
tool-response turn appends the template's own suffix ids for those tool messages. So the tensors the update
scores are, token for token, what the policy saw and wrote. Qwen3's template drops earlier ``<think>`` blocks
when it re-renders history, which is why re-rendering the whole chat each turn would be wrong.

Masks and rewards: ``action_mask`` is 1 on sampled tokens and 0 on prompt, tool-response and padding tokens.
Each turn's environment reward sits on that turn's last sampled token in ``scores``.

Ends of episodes: ``terminated`` (success, or a final answer), ``truncated`` (the turn limit, or the env's guard on
repeated invalid turns), or ``cut`` (the next turn would outgrow ``max_context``; counted in the metrics). None
of them is bootstrapped: the value after an episode's last action token is 0 (see ``ppo.algo.core.compute_gae``). That is
right for the turn limit too: the task ends there and no further reward can come, so the return is complete, not a
time-limit artefact of an endless task.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from ppo.rollout.engine import make_engine

SENTINEL = "\u2063qwen-tool-turn-end\u2063"


class ChatFormat:
    """Token-level view of a chat template: the first prompt, and the ids that follow an assistant turn."""

    def __init__(self, tokenizer, enable_thinking: bool = False):
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        vocab = tokenizer.get_vocab()
        self.end_of_turn_id = vocab.get("<|im_end|>", tokenizer.eos_token_id)
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None or self.pad_id == self.end_of_turn_id:
            raise ValueError(
                "the tokenizer needs a pad token distinct from its end-of-turn token "
                f"(pad={self.pad_id}, end of turn={self.end_of_turn_id})"
            )

    def _render(self, messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            add_generation_prompt=generation_prompt,
            enable_thinking=self.enable_thinking,
            tokenize=False,
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render_prompt(self, messages: list[dict], tools: list[dict] | None) -> str:
        """The text of the chat so far plus the assistant generation prompt."""
        return self._render(messages, tools, generation_prompt=True)

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        """The ids of the chat so far plus the assistant generation prompt."""
        return self.encode(self.render_prompt(messages, tools))

    def suffix_ids(self, messages: list[dict]) -> list[int]:
        """Ids that follow an assistant turn's end-of-turn token: the messages the env appended after it (tool
        responses; in a conversation, the next user message; a message without a role is a tool response) and
        the next generation prompt.

        Found by rendering a chat whose assistant turn holds a sentinel and taking what the template writes after
        it, so any template that renders assistant content verbatim works (Qwen3's included), and the ids are the
        template's own.
        """
        chat = [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": SENTINEL},
            *(
                {"role": "user", "content": m["content"]}
                if m.get("role") == "user"
                else {"role": "tool", "content": m["content"], "name": m.get("name")}
                for m in messages
            ),
        ]
        text = self._render(chat, None, generation_prompt=True)
        eos = self.tokenizer.convert_ids_to_tokens(self.end_of_turn_id)
        marker = SENTINEL + eos
        at = text.find(marker)
        if at < 0:
            raise ValueError("the chat template does not end assistant turns with its end-of-turn token")
        return self.encode(text[at + len(marker) :])

    def decode_turn(self, ids: list[int]) -> str:
        """Text of a sampled turn for the environment (the end-of-turn token removed, tags kept)."""
        if ids and ids[-1] == self.end_of_turn_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)


@dataclass
class Episode:
    """One episode as token lists (parallel: ``ids``, ``action_mask``, ``scores``) plus what the env reported."""

    task_id: str
    category: str
    ids: list[int]
    action_mask: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    success: bool = False
    terminated: bool = False
    truncated: bool = False
    cut: bool = False
    done: bool = False

    def __post_init__(self) -> None:
        if not self.action_mask:
            self.action_mask = [0] * len(self.ids)
            self.scores = [0.0] * len(self.ids)

    def extend(self, ids: list[int], is_action: bool) -> None:
        self.ids += ids
        self.action_mask += [int(is_action)] * len(ids)
        self.scores += [0.0] * len(ids)

    def add_turn(self, chat: ChatFormat, turn: list[int], following: list[dict] | None) -> None:
        """Append an assistant turn's ids (actions) and, when the episode goes on (``following``, the messages the
        env appended after the turn, is not None), the template's suffix for them (not actions). The one place an
        episode's token layout is written: rollouts and the warm start's demonstrations both use it."""
        self.extend(turn, is_action=True)
        if following is None:
            return
        suffix = chat.suffix_ids(following)
        if turn[-1] != chat.end_of_turn_id:  # the turn ran out of tokens: close it as the template would have
            suffix = [chat.end_of_turn_id, *suffix]
        self.extend(suffix, is_action=False)

    @property
    def episodic_return(self) -> float:
        return float(sum(self.rewards))


@dataclass
class RolloutBatch:
    """Right-padded (B, T) tensors of a batch of episodes, and the episodes themselves."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    action_mask: torch.Tensor  # (B, T) float
    scores: torch.Tensor  # (B, T) float, each turn's env reward on its last action token
    episodes: list[Episode]
    generated_tokens: int
    generation_seconds: float
    env_seconds: float  # tool time not hidden behind generation (calls start as each turn ends)

    def __len__(self) -> int:
        return len(self.episodes)


def pad_episodes(episodes: list[Episode], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the episodes' token lists into (B, T) tensors."""
    width = max(len(e.ids) for e in episodes)
    batch = len(episodes)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    action_mask = torch.zeros((batch, width), dtype=torch.float32)
    scores = torch.zeros((batch, width), dtype=torch.float32)
    for row, e in enumerate(episodes):
        n = len(e.ids)
        input_ids[row, :n] = torch.tensor(e.ids)
        attention_mask[row, :n] = 1
        action_mask[row, :n] = torch.tensor(e.action_mask, dtype=torch.float32)
        scores[row, :n] = torch.tensor(e.scores, dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "action_mask": action_mask,
        "scores": scores,
    }


# The first task whose prompt alone outgrew max_context: one warning a process.
_warned_prompt_cut: list[str] = []


def collect_rollouts(
    actor_critic,
    chat: ChatFormat,
    pool,
    task_ids: list[str],
    *,
    max_new_tokens: int,
    max_context: int,
    temperature: float,
    engine: str = "static",
    cuda_graphs: bool = True,
    on_turn: Callable[[int, Episode, str, dict], None] | None = None,
) -> RolloutBatch:
    """Play one episode per task id on the env pool, all episodes advancing one turn at a time together.

    ``engine`` samples the turns (see `ppo.rollout.engine`): built once for the rollout, so a turn feeds only the tokens
    appended since the episode's previous turn. ``on_turn(row, episode, text, info)``, when given, is called after
    each turn is recorded, with the turn's text and the env's step info (``ppo.chat`` prints from it).
    """
    resets = pool.reset(task_ids=task_ids)
    episodes = []
    for (_obs, info), task_id in zip(resets, task_ids, strict=True):
        ids = chat.prompt_ids(info["messages"], info["tools"])
        if len(ids) + max_new_tokens > max_context and not _warned_prompt_cut:
            _warned_prompt_cut.append(task_id)
            warnings.warn(
                f"the prompt of task {task_id!r} is {len(ids)} tokens: with max_new_tokens {max_new_tokens} it does "
                f"not fit max_context {max_context}, so its episodes are cut before their first turn (counted in "
                "charts/cut_episodes; warned once); raise --max-context",
                RuntimeWarning,
                stacklevel=2,
            )
        episodes.append(
            Episode(task_id, str(info["task"].get("category", "")), ids, messages=info["messages"])
        )
    gen_tokens, env_seconds = 0, 0.0
    model = actor_critic.model
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    with actor_critic.policy():
        runner = make_engine(
            model,
            kind=engine,
            rows=len(episodes),
            max_context=max_context,
            pad_id=chat.pad_id,
            cuda_graphs=cuda_graphs,
        )
    gen_seconds = time.perf_counter() - start
    try:
        while True:
            for e in episodes:
                if not e.done and len(e.ids) + max_new_tokens > max_context:
                    e.cut = e.truncated = e.done = True
            active = [i for i, e in enumerate(episodes) if not e.done]
            if not active:
                break
            turns, results, seconds = _play_turn(
                runner, actor_critic, chat, pool, episodes, active, max_new_tokens, temperature
            )
            gen_seconds += seconds[0]
            env_seconds += seconds[1]
            gen_tokens += sum(len(t) for t in turns)
            for i, turn in zip(active, turns, strict=True):
                _record_turn(chat, episodes[i], turn, results[i])
                if on_turn is not None:
                    on_turn(i, episodes[i], chat.decode_turn(turn), results[i][4])
    finally:
        runner.close()
        model.train(was_training)
    tensors = pad_episodes(episodes, chat.pad_id)
    return RolloutBatch(
        **tensors,
        episodes=episodes,
        generated_tokens=gen_tokens,
        generation_seconds=gen_seconds,
        env_seconds=env_seconds,
    )


def _play_turn(runner, actor_critic, chat, pool, episodes, active, max_new_tokens, temperature):
    """Sample one turn of the `active` episodes and step their envs. Each episode's tool calls start as soon as
    its turn is final (`Engine.sample`'s ``on_turn_end``), while longer turns are still being sampled.

    Returns the turns, the env results by episode index, and (generation seconds, tool seconds that generation
    did not hide)."""
    submitted: dict[int, Future] = {}

    def submit(k: int, turn: list[int]) -> None:
        submitted[active[k]] = pool.submit(active[k], chat.decode_turn(turn))

    start = time.perf_counter()
    try:
        with actor_critic.policy():
            turns = runner.sample(
                active,
                [episodes[i].ids for i in active],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                end_of_turn_id=chat.end_of_turn_id,
                on_turn_end=submit,
            ).tokens
    except BaseException:
        wait(list(submitted.values()))  # no env is left mid-step behind the error
        raise
    generation = time.perf_counter() - start
    start = time.perf_counter()
    for k, turn in enumerate(turns):  # an engine that did not report a turn: submitted now
        if active[k] not in submitted:
            submit(k, turn)
    results = dict(zip(active, pool.results([submitted[i] for i in active]), strict=True))
    return turns, results, (generation, time.perf_counter() - start)


def _record_turn(chat: ChatFormat, episode: Episode, turn: list[int], result: tuple[Any, ...]) -> None:
    """Append a sampled turn (and, if the episode goes on, the tool-response suffix) to an episode."""
    _obs, reward, terminated, truncated, info = result
    if not turn:
        raise ValueError("the sampler returned an empty turn; max_new_tokens must be at least 1")
    ended = bool(terminated or truncated)
    last_action = len(episode.ids) + len(turn) - 1  # the turn's reward sits on its last sampled token
    episode.add_turn(chat, turn, None if ended else info["new_messages"])
    episode.scores[last_action] += float(reward)
    episode.rewards.append(float(reward))
    episode.statuses.append(info["status"])
    episode.messages = info["messages"]
    if info["status"] == "success":
        episode.success = True
    if ended:
        episode.terminated, episode.truncated, episode.done = bool(terminated), bool(truncated), True
