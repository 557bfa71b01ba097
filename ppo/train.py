"""PPO for tool calling: ``python -m ppo.train``.

One iteration, top to bottom (cleanrl's shape, wrapped in ``main(cfg)`` so tests can import it):

1. rollout: ``num_episodes`` episodes on the MCP env pool, sampled by the policy (``ppo.rollout``);
2. scoring: old log-probs (policy), reference log-probs (adapters off) and values (critic) of every token;
3. rewards and KL: each turn's env reward on its last action token, minus ``kl_coef * KL`` on every action token;
4. advantages: GAE over action tokens only (tool output is skipped), whitened over the batch;
5. PPO epochs: clipped surrogate + clipped value loss over shuffled minibatches with gradient accumulation;
6. logging, KL-controller update, checkpoint.

Letters: B episodes, T token positions.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ppo import core
from ppo import distributed as dist
from ppo.checkpoint import (
    CheckpointError,
    RunFolderError,
    TaskSampler,
    latest_checkpoint,
    load_trainer_state,
    output_dir_of,
    run_config,
    save_checkpoint,
    save_config,
)
from ppo.config import Config, config_table, from_dict, given_settings, parse_args, to_dict
from ppo.monitor import MetricsLogger, episode_metrics, render_episode, summary_line
from ppo.rollout import ChatFormat, RolloutBatch, collect_rollouts
from ppo.setup import (
    build_optimizer,
    build_scheduler,
    input_errors,
    load_policy,
    make_env_pool,
    prepare_model,
)
from ppo.tasks import resolve_tasks


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def score_rollouts(actor_critic, batch: RolloutBatch, micro_batch_size: int, temperature: float) -> dict:
    """Old log-probs, reference log-probs and values of every token, micro-batch by micro-batch. (B, T) each."""
    out = {"old_logprobs": [], "ref_logprobs": [], "old_values": []}
    device = next(actor_critic.model.parameters()).device
    for rows in torch.arange(len(batch)).split(micro_batch_size):
        ids, attn = (t.to(device) for t in _trimmed(batch.input_ids[rows], batch.attention_mask[rows]))
        out["old_logprobs"].append(
            actor_critic.score(ids, attn, temperature=temperature, role="policy")["logprobs"]
        )
        out["ref_logprobs"].append(
            actor_critic.score(ids, attn, temperature=temperature, role="reference")["logprobs"]
        )
        out["old_values"].append(actor_critic.values(ids, attn))
    width = batch.input_ids.shape[1]
    return {k: torch.cat([_pad_to(t.float().cpu(), width) for t in v]) for k, v in out.items()}


def ppo_update(
    actor_critic,
    optimizer,
    batch: RolloutBatch,
    data: dict,
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
            for rows in minibatch.split(cfg.micro_batch_size):
                stats, weight, n_tok = _micro_step(
                    actor_critic, batch, data, rows, cfg, n_action, device, train_policy
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
    stats["perf/skipped_steps"] = float(skipped)
    stats["perf/update_tokens"] = float(tokens)
    stats["perf/optimizer_steps"] = float(steps)
    return stats


def _micro_step(
    actor_critic, batch, data, rows, cfg: Config, n_action: float, device, train_policy: bool = True
) -> tuple[dict, float, int]:
    """Forward and backward of one micro-batch; its loss is weighted so the minibatch loss is a token-mean."""
    ids, attn = _trimmed(batch.input_ids[rows], batch.attention_mask[rows])
    width = ids.shape[1]
    sl = (rows, slice(0, width))
    mask = batch.action_mask[sl].to(device)
    out = actor_critic.forward_train(ids.to(device), attn.to(device), temperature=cfg.temperature)
    pg_loss, pg_stats = core.policy_loss(
        out["logprobs"].float(),
        data["old_logprobs"][sl].to(device),
        data["advantages"][sl].to(device),
        mask,
        clip_eps=cfg.clip_eps,
        dual_clip=cfg.dual_clip,
    )
    vf_loss, vf_stats = core.value_loss(
        out["values"].float(),
        data["old_values"][sl].to(device),
        data["returns"][sl].to(device),
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


def compute_advantages(batch: RolloutBatch, data: dict, cfg: Config, kl_coef: float) -> dict:
    """Rewards with the KL penalty, GAE, whitening. Adds rewards, kl, advantages, returns to ``data``."""
    scores = batch.scores * cfg.reward_scale
    rewards, kl = core.rewards_with_kl(
        scores, data["old_logprobs"], data["ref_logprobs"], batch.action_mask, kl_coef, kind=cfg.kl_kind
    )
    gamma = (
        core.turn_discounts(batch.action_mask, cfg.gamma, cfg.turn_gamma) if cfg.turn_gamma < 1 else cfg.gamma
    )
    advantages, returns = core.compute_gae(rewards, data["old_values"], batch.action_mask, gamma, cfg.lam)
    if cfg.center_per_task and cfg.episodes_per_task > 1:
        task_index = {task: k for k, task in enumerate(dict.fromkeys(e.task_id for e in batch.episodes))}
        groups = torch.tensor([task_index[e.task_id] for e in batch.episodes])
        advantages = core.center_per_group(advantages, batch.action_mask, groups)
    if cfg.whiten_advantages:
        advantages = _whiten(advantages, batch.action_mask)
    return {**data, "rewards": rewards, "kl": kl, "advantages": advantages, "returns": returns}


def _whiten(advantages: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Whiten over the batch's action tokens (over every rank's batch under torchrun)."""
    if dist.active():
        return core.masked_whiten(advantages, action_mask, reduce=dist.all_sum)
    if action_mask.sum() < 2:  # a batch of cut episodes has nothing to whiten
        return advantages
    return core.masked_whiten(advantages, action_mask)


def check_task_suite(cfg: Config) -> None:
    """``--check-tasks``: replay every oracle on the server first; a broken suite stops the run (TaskError), with
    every bad line counted, not only the first."""
    import mcp_mock
    from env import TaskError
    from ppo.tasks import describe, failures, run_check

    source = cfg.tasks or list(mcp_mock.load_tasks("train"))
    reports = run_check(source, cfg.mcp_server, max_turns=cfg.max_turns, call_timeout=cfg.call_timeout)
    bad = failures(reports)
    if bad:
        shown = "; ".join(describe(r) for r in bad[:3])
        raise TaskError(
            f"--check-tasks: {len(bad)} of {len(reports)} tasks fail the check ({shown}"
            + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
            + f"). See them all with: python -m ppo.tasks check {cfg.tasks or 'TASKS'}"
        )
    print(f"check-tasks: all {len(reports)} tasks pass", flush=True)


def main(cfg: Config) -> dict:
    """Train; returns the metrics of the last iteration. Under torchrun, every rank runs this."""
    rank, world = dist.init()
    cfg, output_dir, resume_from = _prepare_run(cfg)
    seed_everything(cfg.seed + rank)
    if cfg.check_tasks and dist.is_main():
        check_task_suite(cfg)
    tasks = resolve_tasks(cfg.tasks, split="train")  # before the model: a bad task file fails in a second
    model_path = prepare_model(cfg)  # tiny: built and warm-started here the first time (cached)
    actor_critic = load_policy(cfg, device=dist.local_device(), model_path=model_path)
    dist.broadcast_parameters(actor_critic.policy_parameters() + actor_critic.critic_parameters())
    chat = ChatFormat(actor_critic.tokenizer)
    optimizer = build_optimizer(cfg, actor_critic)
    scheduler = build_scheduler(cfg, optimizer)
    kl_ctl = (
        core.AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.adaptive_kl
        else core.FixedKLController(cfg.init_kl_coef)
    )
    shard = tasks[rank::world]  # each rank owns a disjoint shard of the tasks
    if not shard:
        raise ValueError(f"{len(tasks)} task(s) cannot be shared among {world} ranks")
    sampler = TaskSampler([t["id"] for t in shard], cfg.seed + rank)
    start = 0
    if resume_from is not None:
        start = _restore(resume_from, actor_critic, optimizer, scheduler, kl_ctl, sampler)
        print(f"resuming from {resume_from} at iteration {start}")
    else:
        _open_run_folder(cfg, output_dir)
    logger = MetricsLogger(output_dir, start_iteration=start, enabled=dist.is_main())
    if start == 0:
        logger.text("config", config_table(cfg), 0)
    if dist.is_main():
        print(config_table(cfg) if start == 0 else f"output: {output_dir}", flush=True)
    metrics: dict = {}
    progress = tqdm(
        range(start, cfg.iterations), desc="PPO", unit="it", initial=start, total=cfg.iterations,
        disable=not dist.is_main(), dynamic_ncols=True,
    )  # fmt: skip
    eval_tasks = _eval_tasks(cfg)
    if eval_tasks and start == 0:
        # Iteration -1 is the starting policy, so every curve has its point of departure.
        logger.log(-1, greedy_eval(actor_critic, cfg, eval_tasks))
    with make_env_pool(cfg, shard) as pool:
        for iteration in progress:
            metrics = run_iteration(
                iteration, cfg, actor_critic, chat, pool, sampler, optimizer, kl_ctl, logger
            )
            scheduler.step()
            done = iteration + 1
            if eval_tasks and (done % cfg.eval_every == 0 or done == cfg.iterations):
                metrics.update(greedy_eval(actor_critic, cfg, eval_tasks))
            logger.log(iteration, metrics)
            if dist.is_main():
                progress.write(summary_line(iteration, cfg.iterations, metrics))
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.iterations:
                _save(output_dir, done, cfg, actor_critic, optimizer, scheduler, kl_ctl, sampler)
    logger.close()
    if dist.is_main():
        print(f"done: {output_dir}")
    dist.shutdown()
    return metrics


def _save(output_dir, done, cfg, actor_critic, optimizer, scheduler, kl_ctl, sampler) -> None:
    """Checkpoint after ``done`` iterations (rank 0 writes; every rank's task order is kept)."""
    samplers = dist.all_gather_objects(sampler.state_dict())
    if dist.is_main():
        state = {
            "iteration": done,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "kl_controller": kl_ctl.state_dict(),
            "samplers": samplers,
            "world_size": dist.world_size(),
            "config": to_dict(cfg),
        }
        save_checkpoint(output_dir, done, actor_critic, state)
    dist.barrier()


def run_iteration(iteration, cfg, actor_critic, chat, pool, sampler, optimizer, kl_ctl, logger) -> dict:
    """One PPO iteration; every random draw in it is seeded from (seed, rank, iteration), so a resume replays it."""
    rank = dist.rank()
    torch.manual_seed((cfg.seed * 1_000_003 + iteration) * 131 + rank)
    generator = torch.Generator().manual_seed((cfg.seed * 7_919 + iteration) * 131 + rank)
    started = time.perf_counter()
    # Each task drawn is played episodes_per_task times, side by side in the batch.
    task_ids = [
        t
        for t in sampler.sample(cfg.num_episodes // cfg.episodes_per_task)
        for _ in range(cfg.episodes_per_task)
    ]
    batch = collect_rollouts(
        actor_critic,
        chat,
        pool,
        task_ids,
        max_new_tokens=cfg.max_new_tokens,
        max_context=cfg.max_context,
        engine=cfg.engine,
        cuda_graphs=cfg.cuda_graphs,
        temperature=cfg.temperature,
    )
    data = score_rollouts(actor_critic, batch, cfg.micro_batch_size, cfg.temperature)
    kl_coef = kl_ctl.value
    data = compute_advantages(batch, data, cfg, kl_coef)
    update_start = time.perf_counter()
    train_policy = iteration >= cfg.critic_warmup_iterations
    stats = ppo_update(actor_critic, optimizer, batch, data, cfg, generator, train_policy)
    update_seconds = time.perf_counter() - update_start
    episode_kl = (data["kl"] * batch.action_mask).sum(dim=1)  # (B,) each episode's KL, summed over its tokens
    kl_sum, n_episodes, kl_tokens, n_tokens, gen_tokens, gen_seconds = dist.all_sum(
        [
            float(episode_kl.sum()),
            float(len(batch)),
            float((data["kl"] * batch.action_mask).sum()),
            float(batch.action_mask.sum()),
            float(batch.generated_tokens),
            batch.generation_seconds,
        ]
    )
    kl_ctl.update(kl_tokens / max(n_tokens, 1.0), int(n_episodes))  # the target is per action token
    stats = {k: v / dist.world_size() for k, v in zip(stats, dist.all_sum(list(stats.values())), strict=True)}
    episodes = [e for rank_episodes in dist.all_gather_objects(_light(batch.episodes)) for e in rank_episodes]
    metrics = {
        **episode_metrics(episodes),
        **stats,
        "charts/episodes": n_episodes,
        "objective/kl_ref": kl_sum / n_episodes,
        "objective/kl_ref_per_token": kl_tokens / max(n_tokens, 1.0),
        "objective/kl_coef": kl_coef,
        "perf/rollout_tokens_per_s": gen_tokens / max(gen_seconds / dist.world_size(), 1e-9),
        "perf/update_tokens_per_s": stats["perf/update_tokens"]
        * dist.world_size()
        / max(update_seconds, 1e-9),
        "perf/env_seconds": batch.env_seconds,
        "perf/iteration_seconds": time.perf_counter() - started,
        "perf/learning_rate": optimizer.param_groups[0]["lr"],
    }
    if cfg.log_samples_every and iteration % cfg.log_samples_every == 0:
        for k, episode in enumerate(batch.episodes[:3]):
            logger.text(f"samples/{k}", render_episode(episode), iteration)
    return metrics


def greedy_eval(actor_critic, cfg: Config, tasks: list[dict]) -> dict:
    """``eval/*`` metrics of a greedy pass over ``tasks``; each rank plays its own shard, metrics cover all."""
    from ppo.evaluate import play_greedy, summarize

    shard = tasks[dist.rank() :: dist.world_size()]
    episodes = play_greedy(actor_critic, cfg, shard, batch_size=cfg.num_episodes) if shard else []
    episodes = [e for rank_episodes in dist.all_gather_objects(_light(episodes)) for e in rank_episodes]
    result = summarize(episodes)
    out = {"eval/success_rate": result["success_rate"], "eval/episodes": float(result["episodes"])}
    out.update({f"eval/status/{k}": v for k, v in result["status"].items()})
    out["eval/bad_turns"] = out["eval/status/invalid_json"] + out["eval/status/structural_fail"]
    out.update({f"eval/category/{name}": c["success_rate"] for name, c in result["per_category"].items()})
    return out


def _eval_tasks(cfg: Config) -> list[dict]:
    """The periodic evaluation's tasks (the mock's val split unless ``--eval-tasks``), or [] when it is off."""
    if not cfg.eval_every:
        return []
    if cfg.tasks and not cfg.eval_tasks:
        # The mock's val split says nothing about the user's own tasks and server.
        if dist.is_main():
            print("periodic evaluation off: --tasks was given without --eval-tasks", flush=True)
        return []
    tasks = resolve_tasks(cfg.eval_tasks, split="val")
    return tasks[: cfg.eval_episodes] if cfg.eval_episodes else tasks


def _light(episodes: list) -> list:
    """The episodes without their token lists and chats: what metrics need, cheap to send between ranks."""
    return [dataclasses.replace(e, ids=[], action_mask=[0], scores=[0.0], messages=[]) for e in episodes]


# What --resume may change: how long the run goes on, how it is watched, and where it runs. Everything else
# (model, tasks, PPO settings, seed) is part of what is being continued, so a flag changing it is refused.
RESUMABLE = (
    "iterations", "save_every", "log_samples_every", "eval_every", "eval_episodes", "eval_tasks",
    "mcp_server", "call_timeout", "device", "check_tasks",
)  # fmt: skip
_NOT_SETTINGS = ("resume", "overwrite", "output_dir", "preset")
RUN_FILES = {"config.json", "metrics.jsonl", "checkpoints", "tensorboard"}  # what marks a folder as a run


def _prepare_run(cfg: Config) -> tuple[Config, Path, Path | None]:
    """Resolve the output directory and, on ``--resume``, the saved config with the flags that may change.

    A new run refuses an output directory that already holds one, unless ``overwrite`` (then it is deleted).
    """
    if cfg.resume:
        checkpoint = latest_checkpoint(cfg.resume, quiet=not dist.is_main())
        output_dir = output_dir_of(checkpoint)
        saved = from_dict(run_config(checkpoint))
        _apply_resume_flags(cfg, saved, output_dir)
        return saved, output_dir, checkpoint
    # Every rank must write to rank 0's directory, whatever time each rank reads from its clock.
    default = f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    output_dir = Path(dist.all_gather_objects(cfg.output_dir or default)[0])
    cfg.output_dir = str(output_dir)
    held = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    # Every rank sees the same folder, so all refuse together, before anything is written.
    if held and not set(held) & RUN_FILES:
        raise RunFolderError(
            f"{output_dir} is not empty ({listed}) and holds no run; choose an empty or new --output-dir"
        )
    if held and not cfg.overwrite:
        raise RunFolderError(
            f"{output_dir} already holds a run ({listed}); continue it with --resume {output_dir}, choose "
            "another --output-dir, or pass --overwrite to delete it and start afresh"
        )
    return cfg, output_dir, None


def _open_run_folder(cfg: Config, output_dir: Path) -> None:
    """Create a new run's folder and write its config (with ``overwrite``, deleting the run there first).

    Called once the model and the tasks have loaded, so a run that cannot start leaves no folder behind.
    """
    dist.barrier()
    if dist.is_main():
        if cfg.overwrite and output_dir.is_dir() and any(output_dir.iterdir()):
            print(f"--overwrite: deleting the run in {output_dir}", flush=True)
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(output_dir, to_dict(cfg))
    dist.barrier()


def _apply_resume_flags(cfg: Config, saved: Config, output_dir: Path) -> None:
    """Carry onto ``saved`` the settings given for the resumed run that may change; refuse the others."""
    refused = []
    given = given_settings(cfg)
    if cfg.output_dir is not None and Path(cfg.output_dir).resolve() != Path(output_dir).resolve():
        refused.append(f"--output-dir {cfg.output_dir} (the run's: {output_dir})")
    for name in sorted(given - set(_NOT_SETTINGS)):
        value, old = getattr(cfg, name), getattr(saved, name)
        if value == old:
            continue
        flag = "--" + name.replace("_", "-")
        if name in RESUMABLE:
            if dist.is_main():
                print(f"resume: {flag} {value} (was {old})", flush=True)
            setattr(saved, name, value)
        else:
            refused.append(f"{flag} {value} (the run's: {old})")
    if "preset" in given and cfg.preset != saved.preset:
        refused.append(f"--preset {cfg.preset} (the run's: {saved.preset})")
    if refused:
        raise RunFolderError(
            "--resume continues a run with its own settings; these flags would change it: "
            + "; ".join(refused)
            + f". Drop them, or start a new run with --output-dir. A resumed run may change {', '.join(RESUMABLE)}"
        )
    saved.resume, saved.output_dir = cfg.resume, str(output_dir)


def _restore(checkpoint, actor_critic, optimizer, scheduler, kl_ctl, sampler) -> int:
    actor_critic.load_adapters(checkpoint)
    state = load_trainer_state(checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    kl_ctl.load_state_dict(state["kl_controller"])
    if state["world_size"] != dist.world_size():
        raise ValueError(
            f"this checkpoint was written by {state['world_size']} rank(s); resume it with as many "
            f"(now {dist.world_size()}), so each rank continues its own task order"
        )
    sampler.load_state_dict(state["samplers"][dist.rank()])
    return int(state["iteration"])


def _trimmed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the right padding columns that no row of this micro-batch uses."""
    used = int(attention_mask.sum(dim=1).max())
    return input_ids[:, :used], attention_mask[:, :used]


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def cli(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        main(cfg)
    except input_errors() as err:
        # Errors about the user's inputs: one clear sentence, not a stack trace from deep inside.
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"interrupted: {_resume_hint(cfg.resume or cfg.output_dir)}", file=sys.stderr)
        raise SystemExit(130) from None


def _resume_hint(run: str | None) -> str:
    """What an interrupted run left to continue from, in one sentence."""
    try:
        checkpoint = latest_checkpoint(run, quiet=True) if run else None
    except (CheckpointError, FileNotFoundError):
        checkpoint = None
    if checkpoint is None:
        return "no checkpoint was written yet, so there is nothing to resume; start the run again"
    return f"checkpoint {checkpoint.name} is intact; continue with --resume {output_dir_of(checkpoint)}"


if __name__ == "__main__":
    cli()

__all__ = ["compute_advantages", "main", "ppo_update", "run_iteration", "score_rollouts"]
