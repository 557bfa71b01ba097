"""PPO learns where reward, not imitation, decides: a regression test of the whole training loop.

The starting policy is made indifferent between two calls for each task: it imitates demonstrations that
answer half of the time with the right tool and half of the time with a tool the server does not have (a
structural failure). Imitation cannot break the tie; only the reward can. PPO must then raise the sampled
success rate by a set margin within a fixed number of iterations, and the same run at learning rate 0 must not
(stable-baselines3 checks its PPO on an identity env the same way). The rollouts, rewards, GAE, critic and
update are the real ones of ``ppo.train.main``; only the model is small and the tasks are few.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from ppo import train
from ppo.infra.config import Config

# Four calculator tasks, one turn each: the first call decides.
EXPRESSIONS = ["2 + 3", "7 * 6", "9 - 4", "8 / 2"]
ANSWERS = ["5", "42", "5", "4"]
ITERATIONS = 8
MARGIN = 0.25


def _tasks() -> list[dict]:
    return [
        {"id": f"pick-{k}", "category": "math", "prompt": f"Use the calculator to compute {expr}.",
         "success": {"tool": "calculator", "result_equals": ANSWERS[k]}, "max_turns": 1,
         "oracle": [{"name": "calculator", "arguments": {"expression": expr}}]}
        for k, expr in enumerate(EXPRESSIONS)
    ]  # fmt: skip


def _indifferent_demos(chat, tasks: list[dict]) -> list[tuple[list[int], list[int]]]:
    """For every task, the same number of right calls (calculator) and invented ones (calc)."""
    from env import MCPGymEnv
    from ppo.tiny.warmstart import call_text, tokenize_demo

    env = MCPGymEnv(tasks=tasks, max_turns=1)
    demos = []
    try:
        for task in tasks:
            _obs, info = env.reset(options={"task_id": task["id"]})
            args = task["oracle"][0]["arguments"]
            for name in ("calculator", "calc") * 4:
                demos.append(tokenize_demo(chat, info, [(call_text(name, args), [])]))
    finally:
        env.close()
    return demos


@pytest.fixture(scope="module")
def indifferent_model(small_tiny_dir, tmp_path_factory):
    """The small tiny model, supervised until it writes either call for every task."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppo.rollout import ChatFormat
    from ppo.tiny.warmstart import supervised_finetune

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(small_tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(small_tiny_dir, dtype=torch.float32)
    chat = ChatFormat(tokenizer)
    demos = _indifferent_demos(chat, _tasks())
    random.Random(0).shuffle(demos)
    supervised_finetune(model, demos, chat.pad_id, epochs=150, lr=3e-3, batch_size=16, seed=0)
    out = tmp_path_factory.mktemp("indifferent")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _run(model_dir, tmp_path, learning_rate: float) -> list[float]:
    """Sampled success rate of each iteration of a short PPO run on the four tasks."""
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text("".join(json.dumps(t) + "\n" for t in _tasks()))
    out = tmp_path / f"run-{learning_rate}"
    cfg = Config(
        model=str(model_dir), warmstart=False, tasks=str(tasks_file), max_turns=1, iterations=ITERATIONS,
        num_episodes=16, episodes_per_task=4, minibatch_size=8, micro_batch_size=8, ppo_epochs=2,
        max_new_tokens=32, max_context=1024, optimizer="adamw", learning_rate=learning_rate,
        critic_learning_rate=3e-3, warmup_iterations=0, output_dir=str(out), save_every=ITERATIONS,
        log_samples_every=0, seed=0,
    )  # fmt: skip
    train.main(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["charts/success_rate"] for x in lines]


@pytest.fixture(scope="module")
def frozen(indifferent_model, tmp_path_factory) -> list[float]:
    """The same run at learning rate 0: the starting policy's success, iteration by iteration."""
    return _run(indifferent_model, tmp_path_factory.mktemp("frozen"), learning_rate=0.0)


def test_the_starting_policy_is_indifferent(frozen):
    # At learning rate 0 the policy is the starting one: it succeeds about half of the time, and stays there.
    assert 0.25 <= sum(frozen) / len(frozen) <= 0.75, frozen
    assert sum(frozen[-3:]) / 3 - sum(frozen[:2]) / 2 < MARGIN, frozen


def test_ppo_raises_success_where_only_reward_decides(indifferent_model, frozen, tmp_path):
    # The margin is over the frozen run's mean (128 episodes of the starting policy), not over the first two
    # iterations (32 episodes, the same policy: the first iteration trains only the critic), whose noise alone
    # put the start at 0.69 on one build. 5e-4: at 1e-3 the policy of the build whose tokenizer keeps the space out
    # of capitalised words lost its shape (entropy 0.12 -> 1.7, invalid JSON in 0.38 of the turns) and success
    # stayed at 0.6; at 3e-3 the build before it did the same.
    learned = _run(indifferent_model, tmp_path, learning_rate=5e-4)
    start, last = sum(frozen) / len(frozen), sum(learned[-3:]) / 3
    assert last - start >= MARGIN and last >= 0.7, (learned, frozen)
