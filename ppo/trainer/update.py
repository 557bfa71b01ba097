"""The PPO update of one batch: scoring, rewards with KL and advantages, then the clipped-surrogate epochs.

Stages hand each other dataclasses: ``score_rollouts`` gives ``Scores`` (old log-probs, reference log-probs,
values), ``compute_advantages`` gives ``Targets`` (those plus rewards, KL, advantages and returns), which
``ppo_update`` consumes. Letters: B episodes, T token positions; every tensor is (B, T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppo.algo import core
from ppo.infra import distributed as dist
from ppo.infra.config import Config
from ppo.rollout import RolloutBatch


@dataclass
class Scores:
    """The scoring pass over a batch: the policy's and the reference's log-probs and the critic's values."""

    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor


@dataclass
class Targets(Scores):
    """What the PPO epochs train towards: the scores plus rewards (with the KL penalty), per-token KL,
    advantages and returns."""

    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def by_length(rows: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``rows`` longest first, so that the micro-batches cut from them pad each row only to rows of about its length
    (the shared prefix is computed once, and padding the rest to a random micro-batch's longest row cost about
    as much as the rows themselves)."""
    lengths = attention_mask[rows].sum(dim=1)
    return rows[torch.argsort(lengths, descending=True, stable=True)]


@torch.no_grad()
def score_rollouts(actor_critic, batch: RolloutBatch, micro_batch_size: int, temperature: float) -> Scores:
    """Old log-probs, reference log-probs and values of every token, micro-batch by micro-batch (rows of about one
    length together), returned in the batch's row order. (B, T) each."""
    out = {"old_logprobs": [], "ref_logprobs": [], "old_values": []}
    device = next(actor_critic.model.parameters()).device
    order = by_length(torch.arange(len(batch)), batch.attention_mask)
    for rows in order.split(micro_batch_size):
        ids, attn = (t.to(device) for t in _trimmed(batch.input_ids[rows], batch.attention_mask[rows]))
        out["old_logprobs"].append(
            actor_critic.score(ids, attn, temperature=temperature, role="policy")["logprobs"]
        )
        out["ref_logprobs"].append(
            actor_critic.score(ids, attn, temperature=temperature, role="reference")["logprobs"]
        )
        out["old_values"].append(actor_critic.values(ids, attn))
    width = batch.input_ids.shape[1]
    inverse = torch.argsort(order)
    return Scores(
        **{k: torch.cat([_pad_to(t.float().cpu(), width) for t in v])[inverse] for k, v in out.items()}
    )


def ppo_update(
    actor_critic,
    optimizer,
    batch: RolloutBatch,
    targets: Targets,
    cfg: Config,
    generator,
    train_policy: bool = True,
) -> dict:
    """``ppo_epochs`` passes of shuffled minibatches; returns the token-weighted mean of the loss stats.

    ``train_policy=False`` (the critic warm-up) leaves the policy loss out of the gradient: only the critic learns.
    """
    params = actor_critic.policy_parameters() + actor_critic.critic_parameters()
    device = next(actor_critic.model.parameters()).device
    totals: dict[str, float] = {}
    weight_sum, skipped, steps, tokens = 0.0, 0, 0, 0
    actor_critic.train()
    for _epoch in range(cfg.ppo_epochs):
        order = torch.randperm(len(batch), generator=generator)
        for minibatch in order.split(cfg.minibatch_size):
            # The token-mean runs over the minibatch's action tokens on every rank together.
            (n_action,) = dist.all_sum([float(batch.action_mask[minibatch].sum())])
            if n_action == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            # Which rows share a micro-batch changes only the summation order of the minibatch's gradient.
            for rows in by_length(minibatch, batch.attention_mask).split(cfg.micro_batch_size):
                stats, weight, n_tok = _micro_step(
                    actor_critic, batch, targets, rows, cfg, n_action, device, train_policy
                )
                tokens += n_tok
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v * weight
                weight_sum += weight
            dist.sum_gradients(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                # A non-finite gradient would poison the 8-bit optimizer state: drop the step instead.
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            totals["grad_norm"] = totals.get("grad_norm", 0.0) + float(grad_norm)
            optimizer.step()
            steps += 1
    stats = {f"losses/{k}": v / max(weight_sum, 1e-12) for k, v in totals.items() if k != "grad_norm"}
    stats["losses/grad_norm"] = totals.get("grad_norm", 0.0) / max(steps, 1)
    # The critic before this update against the returns, over the whole batch (every rank's), as SB3 and cleanrl
    # log it. Averaged over micro-batches it read -1,486 once: they are cut from rows sorted by length, often one
    # task's episodes with nearly equal returns, whose tiny Var(R) divides.
    stats["losses/explained_variance"] = core.explained_variance(
        targets.old_values, targets.returns, batch.action_mask, reduce=dist.all_sum
    )
    stats["perf/skipped_steps"] = float(skipped)
    stats["perf/update_tokens"] = float(tokens)
    stats["perf/optimizer_steps"] = float(steps)
    return stats


def _micro_step(
    actor_critic,
    batch,
    targets: Targets,
    rows,
    cfg: Config,
    n_action: float,
    device,
    train_policy: bool = True,
) -> tuple[dict, float, int]:
    """Forward and backward of one micro-batch; its loss is weighted so the minibatch loss is a token-mean."""
    ids, attn = _trimmed(batch.input_ids[rows], batch.attention_mask[rows])
    width = ids.shape[1]
    sl = (rows, slice(0, width))
    mask = batch.action_mask[sl].to(device)
    out = actor_critic.forward_train(ids.to(device), attn.to(device), temperature=cfg.temperature)
    pg_loss, pg_stats = core.policy_loss(
        out["logprobs"].float(),
        targets.old_logprobs[sl].to(device),
        targets.advantages[sl].to(device),
        mask,
        clip_eps=cfg.clip_eps,
        dual_clip=cfg.dual_clip,
    )
    vf_loss, vf_stats = core.value_loss(
        out["values"].float(),
        targets.old_values[sl].to(device),
        targets.returns[sl].to(device),
        mask,
        clip_eps=cfg.value_clip_eps,
    )
    entropy = core.masked_mean(out["entropy"].float(), mask)
    weight = float(mask.sum()) / n_action
    policy_term = pg_loss - cfg.ent_coef * entropy if train_policy else 0.0
    loss = policy_term + cfg.vf_coef * vf_loss
    (loss * weight).backward()
    stats = {**pg_stats, **vf_stats, "entropy": entropy.item(), "loss": loss.item()}
    return stats, weight, int(attn.sum())


def compute_advantages(batch: RolloutBatch, scores: Scores, cfg: Config, kl_coef: float) -> Targets:
    """Rewards with the KL penalty, GAE, whitening: the ``Targets`` of the PPO epochs."""
    env_rewards = batch.scores * cfg.reward_scale  # each turn's env reward on its last action token
    rewards, kl = core.rewards_with_kl(
        env_rewards, scores.old_logprobs, scores.ref_logprobs, batch.action_mask, kl_coef, kind=cfg.kl_kind
    )
    gamma = (
        core.turn_discounts(batch.action_mask, cfg.gamma, cfg.turn_gamma) if cfg.turn_gamma < 1 else cfg.gamma
    )
    advantages, returns = core.compute_gae(rewards, scores.old_values, batch.action_mask, gamma, cfg.lam)
    if cfg.center_per_task and cfg.episodes_per_task > 1:
        task_index = {task: k for k, task in enumerate(dict.fromkeys(e.task_id for e in batch.episodes))}
        groups = torch.tensor([task_index[e.task_id] for e in batch.episodes])
        advantages = core.center_per_group(advantages, batch.action_mask, groups)
    if cfg.whiten_advantages:
        advantages = _whiten(advantages, batch.action_mask)
    return Targets(
        scores.old_logprobs, scores.ref_logprobs, scores.old_values, rewards, kl, advantages, returns
    )


def _whiten(advantages: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Whiten over the batch's action tokens (over every rank's batch under torchrun)."""
    if dist.active():
        return core.masked_whiten(advantages, action_mask, reduce=dist.all_sum)
    if action_mask.sum() < 2:  # a batch of cut episodes has nothing to whiten
        return advantages
    return core.masked_whiten(advantages, action_mask)


def _trimmed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the right padding columns that no row of this micro-batch uses."""
    used = int(attention_mask.sum(dim=1).max())
    return input_ids[:, :used], attention_mask[:, :used]


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))
