"""The training loop end to end on a small tiny-preset model and the bundled mock server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from ppo import train
from ppo.infra.config import Config
from ppo.infra.setup import base_compute_dtype, build_optimizer, load_policy, make_env_pool
from ppo.rollout import ChatFormat, collect_rollouts
from ppo.rollout.generation import TurnSample
from ppo.tasks import resolve_tasks
from ppo.trainer import loop, update

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = [
    "--no-warmstart", "--num-episodes", "4", "--minibatch-size", "4", "--micro-batch-size", "2",
    "--max-new-tokens", "12", "--max-context", "1024", "--ppo-epochs", "1", "--optimizer", "adamw",
    "--eval-every", "0",
]  # fmt: skip


def small_config(model_dir: Path, out: Path, **kw) -> Config:
    cfg = Config(
        model=str(model_dir), warmstart=False, num_episodes=4, minibatch_size=4, micro_batch_size=2,
        max_new_tokens=12, max_context=1024, ppo_epochs=1, optimizer="adamw", output_dir=str(out),
        save_every=1, log_samples_every=1, iterations=2,
    )  # fmt: skip
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def test_cli_runs_two_iterations_and_writes_metrics_and_checkpoint(small_tiny_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ppo.train", "--model", str(small_tiny_dir), "--iterations", "2",
           "--output-dir", str(out), "--save-every", "5", *SMALL_RUN]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iter    2/2" in proc.stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [0, 1]
    for key in (
        "charts/success_rate", "charts/episodic_return", "losses/policy_loss", "losses/value_loss",
        "losses/approx_kl", "losses/clipfrac", "losses/entropy", "losses/explained_variance",
        "objective/kl_ref", "objective/kl_coef", "perf/rollout_tokens_per_s",
        *(f"env/status/{s}" for s in ("success", "tool_execution", "tool_error", "invalid_json", "structural_fail")),
    ):  # fmt: skip
        assert key in lines[-1], key
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = out / "checkpoints" / "iter_000002"  # the last iteration is always saved
    assert (out / "checkpoints" / "latest").read_text() == "iter_000002"
    policy = load_file(ckpt / "adapter_model.safetensors")
    lora_b = [t for k, t in policy.items() if "lora_B" in k]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # LoRA B starts at zero: the policy moved
    critic = load_file(ckpt / "critic" / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for k, t in critic.items() if "lora_B" in k)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # the checkpoint root is a plain PEFT adapter folder
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small_tiny_dir), ckpt)


@pytest.fixture(scope="module")
def trained_state(small_tiny_dir, tmp_path_factory):
    """One in-process iteration: base weights before and after, value head before and after."""
    out = tmp_path_factory.mktemp("inproc")
    cfg = small_config(small_tiny_dir, out, iterations=1)
    torch.manual_seed(cfg.seed)
    fresh = load_policy(cfg)
    frozen = {k: v.clone() for k, v in fresh.model.named_parameters() if not v.requires_grad}
    head = {k: v.clone() for k, v in fresh.value_head.state_dict().items()}
    train.main(cfg)
    return cfg, out, frozen, head


def test_training_changes_adapters_and_head_but_not_the_base(trained_state):
    cfg, out, frozen, head = trained_state
    from models import load_actor_critic

    trained = load_actor_critic(cfg.model, adapters=out / "checkpoints" / "iter_000001", device="cpu")
    params = dict(trained.model.named_parameters())
    for name, before in frozen.items():
        torch.testing.assert_close(params[name].data, before, rtol=0, atol=0)
    moved = [not torch.equal(v, head[k]) for k, v in trained.value_head.state_dict().items()]
    assert any(moved)


def test_save_every_zero_writes_only_the_last_checkpoint(small_tiny_dir, tmp_path):
    train.main(small_config(small_tiny_dir, tmp_path / "run", save_every=0, iterations=2))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("iter_*")] == ["iter_000002"]


def test_resume_continues_exactly(small_tiny_dir, tmp_path):
    straight = small_config(small_tiny_dir, tmp_path / "straight", iterations=2)
    train.main(straight)
    first = small_config(small_tiny_dir, tmp_path / "resumed", iterations=1)
    train.main(first)
    train.main(Config(resume=str(tmp_path / "resumed"), iterations=2))
    a = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in b] == [0, 1]
    for key in ("charts/episodic_return", "losses/policy_loss", "losses/value_loss", "objective/kl_ref"):
        assert a[1][key] == pytest.approx(b[1][key], rel=1e-5, abs=1e-7), key
    wa = load_file(tmp_path / "straight" / "checkpoints" / "iter_000002" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "resumed" / "checkpoints" / "iter_000002" / "adapter_model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-7)


def _scripted_batch(actor_critic, chat, monkeypatch):
    """A batch whose episodes hold tool output between two turns (a tool error, then a correct call)."""
    from ppo.rollout import episodes as rollout

    tasks = resolve_tasks(None, "train")[:2]
    bad = (
        "<tool_call>\n"
        + json.dumps({"name": "calculator", "arguments": {"expression": "2 +"}})
        + "\n</tool_call>"
    )
    turns = [[*chat.encode(bad), chat.end_of_turn_id]] * 2 + [
        [*chat.encode("I give up."), chat.end_of_turn_id]
    ] * 2

    class Scripted:  # stands in for the engine: the next scripted turn for every context
        def sample(self, rows, contexts, **_kw):
            tokens = [turns.pop(0) for _ in contexts]
            return TurnSample(tokens, [[-1.0] * len(t) for t in tokens])

        def close(self):
            pass

    monkeypatch.setattr(rollout, "make_engine", lambda model, **kw: Scripted())
    with make_env_pool(Config(), tasks, size=2) as pool:
        return collect_rollouts(
            actor_critic,
            chat,
            pool,
            [t["id"] for t in tasks],
            max_new_tokens=64,
            max_context=2048,
            temperature=1.0,
        )


@pytest.mark.parametrize("cpu_bf16_base", [False, True])
def test_first_minibatch_ratio_is_one_and_tool_output_gets_no_gradient(
    small_tiny_dir, monkeypatch, tmp_path, cpu_bf16_base
):
    cfg = small_config(small_tiny_dir, tmp_path, num_episodes=2, minibatch_size=2, micro_batch_size=2)
    cfg.cpu_bf16_base = cpu_bf16_base
    torch.manual_seed(0)
    actor_critic = load_policy(cfg)
    # With --cpu-bf16-base the 4-bit base computes in bf16 (on a CPU with bf16 units), and the ratio is still 1.
    compute = base_compute_dtype(cfg, "cpu") or torch.float32
    linears = [m for m in actor_critic.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and {m.compute_dtype for m in linears} == {compute}
    chat = ChatFormat(actor_critic.tokenizer)
    batch = _scripted_batch(actor_critic, chat, monkeypatch)
    for e in batch.episodes:  # tool output sits between the two turns of every episode
        assert e.statuses == ["tool_error", "structural_fail"]
        mask = e.action_mask
        first_end = mask.index(1) + mask[mask.index(1) :].index(0)
        assert 1 in mask[first_end:]
    data = update.compute_advantages(batch, update.score_rollouts(actor_critic, batch, 2, 1.0), cfg, 0.05)
    captured = {}
    forward = actor_critic.forward_train

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        for key in ("logprobs", "values", "entropy"):
            out[key].retain_grad()
        captured.setdefault("out", out)
        return out

    monkeypatch.setattr(actor_critic, "forward_train", spy)
    stats_seen, rows_seen = [], []
    policy_loss, micro_step = update.core.policy_loss, update._micro_step

    def loss_spy(*args, **kwargs):
        loss, stats = policy_loss(*args, **kwargs)
        stats_seen.append(stats)
        return loss, stats

    def micro_spy(ac, b, d, rows, *args):
        rows_seen.append(rows)
        return micro_step(ac, b, d, rows, *args)

    monkeypatch.setattr(update.core, "policy_loss", loss_spy)
    monkeypatch.setattr(update, "_micro_step", micro_spy)
    optimizer = build_optimizer(cfg, actor_critic)
    update.ppo_update(actor_critic, optimizer, batch, data, cfg, torch.Generator().manual_seed(0))
    first = stats_seen[0]
    assert first["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert first["clipfrac"] == 0.0
    out = captured["out"]
    width = out["logprobs"].shape[1]
    action = batch.action_mask[rows_seen[0], :width].bool()
    for key in ("logprobs", "values"):
        grad = out[key].grad
        assert torch.all(grad[~action] == 0), key  # prompt, tool output and padding: exactly no gradient
        assert grad[action].abs().sum() > 0, key


def train_seeing_task_ids(cfg) -> list[list[str]]:
    """Run ``train.main(cfg)`` and return the task ids of every batch of episodes it collected, in order."""
    seen = []
    collect = loop.collect_rollouts

    def spy(actor_critic, chat, pool, task_ids, **kw):
        seen.append(list(task_ids))
        return collect(actor_critic, chat, pool, task_ids, **kw)

    loop.collect_rollouts = spy
    try:
        train.main(cfg)
    finally:
        loop.collect_rollouts = collect
    return seen


def test_periodic_greedy_evaluation_and_repeated_tasks(small_tiny_dir, tmp_path):
    # Four episodes of one task a batch (episodes_per_task 4), and a greedy pass over 3 validation tasks
    # before training and after each iteration, logged as eval/* with the iteration's metrics.
    out = tmp_path / "run"
    cfg = small_config(small_tiny_dir, out, iterations=1, eval_every=1, eval_episodes=3, log_samples_every=0)
    seen = train_seeing_task_ids(cfg)
    assert len(seen[0]) == 4 and len(set(seen[0])) == 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [-1, 0]
    for line in lines:
        assert line["eval/episodes"] == 3 and 0 <= line["eval/success_rate"] <= 1
        assert (
            line["eval/bad_turns"] == line["eval/status/invalid_json"] + line["eval/status/structural_fail"]
        )
    assert "charts/success_rate" not in lines[0] and "charts/success_rate" in lines[1]


def test_train_pool_draws_only_the_first_tasks_again_and_again(small_tiny_dir, tmp_path):
    from ppo.tasks import resolve_tasks

    cfg = small_config(small_tiny_dir, tmp_path / "run", iterations=2, train_pool=2, episodes_per_task=1,
                       save_every=0, log_samples_every=0)  # fmt: skip
    seen = [task for batch in train_seeing_task_ids(cfg) for task in batch]
    first_two = {t["id"] for t in resolve_tasks(None, "train")[:2]}
    assert len(seen) == 8 and set(seen) == first_two  # 4 episodes an iteration, each pool task drawn 4 times


def _sampled_batch(actor_critic, cfg, n=6):
    """``n`` episodes sampled from the small model: rows of different lengths."""
    chat = ChatFormat(actor_critic.tokenizer)
    tasks = resolve_tasks(None, "train")[:n]
    with make_env_pool(cfg, tasks, size=n) as pool:
        return collect_rollouts(actor_critic, chat, pool, [t["id"] for t in tasks], max_new_tokens=24,
                                max_context=1024, engine="loop", temperature=1.0)  # fmt: skip


def test_length_sorted_micro_batches_change_neither_scores_nor_the_gradient(small_tiny_dir, tmp_path):
    """Scoring and the update cut micro-batches from rows sorted by length; each row's scores come back in its
    place, and a minibatch's gradient is the one of a single pass over all its rows."""
    cfg = small_config(small_tiny_dir, tmp_path, num_episodes=6, minibatch_size=6, micro_batch_size=6)
    torch.manual_seed(0)
    actor_critic = load_policy(cfg)
    batch = _sampled_batch(actor_critic, cfg)
    lengths = batch.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 2 and not torch.equal(
        update.by_length(torch.arange(6), batch.attention_mask), torch.arange(6)
    )
    whole = update.score_rollouts(actor_critic, batch, 6, 1.0)
    for micro in (1, 4):
        parts = update.score_rollouts(actor_critic, batch, micro, 1.0)
        for key in ("old_logprobs", "ref_logprobs", "old_values"):
            torch.testing.assert_close(getattr(parts, key), getattr(whole, key), atol=2e-5, rtol=1e-4)
    targets = update.compute_advantages(batch, whole, cfg, 0.05)
    params = actor_critic.policy_parameters() + actor_critic.critic_parameters()
    grads = {}
    for micro in (6, 4, 1):
        cfg.micro_batch_size = micro
        optimizer = torch.optim.SGD(params, lr=0.0)  # the gradient is left on the parameters; nothing moves
        update.ppo_update(actor_critic, optimizer, batch, targets, cfg, torch.Generator().manual_seed(0))
        grads[micro] = [p.grad.clone() for p in params]
    assert sum(float(g.abs().sum()) for g in grads[6]) > 0
    for micro in (4, 1):
        for a, b in zip(grads[micro], grads[6], strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
