"""The training loop: ``main(cfg)`` runs a whole PPO run, ``run_iteration`` one iteration of it.

One iteration, top to bottom (cleanrl's shape, wrapped in ``main(cfg)`` so tests can import it):

1. rollout: ``num_episodes`` episodes on the MCP env pool, sampled by the policy (``ppo.rollout``);
2. scoring: old log-probs (policy), reference log-probs (adapters off) and values (critic) of every token;
3. rewards and KL: each turn's env reward on its last action token, minus ``kl_coef * KL`` on every action token;
4. advantages: GAE over action tokens only (tool output is skipped), whitened over the batch;
5. PPO epochs: clipped surrogate + clipped value loss over shuffled minibatches with gradient accumulation;
6. logging, KL-controller update, checkpoint.

Steps 2-5 are ``ppo.trainer.update``; the run's state (policy, optimizer, schedule, KL controller, task order) is
one ``RunState``. Letters: B episodes, T token positions.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ppo.algo import core
from ppo.infra import distributed as dist
from ppo.infra.checkpoint import (
    RunFolderError,
    latest_checkpoint,
    load_trainer_state,
    output_dir_of,
    run_config,
    save_checkpoint,
    save_config,
)
from ppo.infra.config import Config, config_table, from_dict, given_settings, to_dict
from ppo.infra.monitor import MetricsLogger, episode_metrics, render_episode, summary_line
from ppo.infra.setup import build_optimizer, build_scheduler, load_policy, make_env_pool, prepare_model
from ppo.rollout import ChatFormat, collect_rollouts
from ppo.tasks import resolve_tasks
from ppo.trainer.state import RunState, TaskSampler
from ppo.trainer.update import compute_advantages, ppo_update, score_rollouts


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_task_suite(cfg: Config) -> None:
    """``--check-tasks``: replay every oracle on the server first; a broken suite stops the run (TaskError), with
    every bad line counted, not only the first."""
    from env import TaskError
    from ppo.tasks import describe, failures, run_check

    reports = run_check(
        _check_source(cfg), cfg.mcp_server, max_turns=cfg.max_turns, call_timeout=cfg.call_timeout
    )
    bad = failures(reports)
    if bad:
        shown = "; ".join(describe(r) for r in bad[:3])
        raise TaskError(
            f"--check-tasks: {len(bad)} of {len(reports)} tasks fail the check ({shown}"
            + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
            + f"). See them all with: {_check_command(cfg)}"
        )
    print(f"check-tasks: all {len(reports)} tasks pass", flush=True)


def _check_source(cfg: Config) -> str:
    """The task file ``--check-tasks`` checks: ``--tasks``, else the mock's train split."""
    import mcp_mock

    return cfg.tasks or str(Path(mcp_mock.TASKS_DIR) / "train.jsonl")


def _check_command(cfg: Config) -> str:
    """The ``ppo.tasks check`` command line that checks what ``--check-tasks`` checked."""
    import shlex

    parts = ["python", "-m", "ppo.tasks", "check", _check_source(cfg), "--max-turns", str(cfg.max_turns)]
    if cfg.mcp_server:
        parts += ["--mcp-server", cfg.mcp_server]
    return shlex.join(parts)


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
    pool_tasks = tasks[: cfg.train_pool] if cfg.train_pool else tasks
    shard = pool_tasks[rank::world]  # each rank owns a disjoint shard of the tasks
    if not shard:
        raise ValueError(f"{len(pool_tasks)} task(s) cannot be shared among {world} ranks")
    state = RunState(
        actor_critic, optimizer, scheduler, kl_ctl, TaskSampler([t["id"] for t in shard], cfg.seed + rank)
    )
    start = 0
    if resume_from is not None:
        actor_critic.load_adapters(resume_from)
        start = state.load_state_dict(load_trainer_state(resume_from))
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
            metrics = run_iteration(iteration, cfg, state, chat, pool, logger)
            scheduler.step()
            done = iteration + 1
            if eval_tasks and (done % cfg.eval_every == 0 or done == cfg.iterations):
                metrics.update(greedy_eval(actor_critic, cfg, eval_tasks))
            logger.log(iteration, metrics)
            if dist.is_main():
                progress.write(summary_line(iteration, cfg.iterations, metrics))
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.iterations:
                _save(output_dir, done, cfg, state)
    logger.close()
    if dist.is_main():
        print(f"done: {output_dir}")
    dist.shutdown()
    return metrics


def _save(output_dir: Path, done: int, cfg: Config, state: RunState) -> None:
    """Checkpoint after ``done`` iterations (rank 0 writes; every rank's task order is kept)."""
    trainer_state = state.state_dict(done, to_dict(cfg))
    if dist.is_main():
        save_checkpoint(output_dir, done, state.actor_critic, trainer_state)
    dist.barrier()


def run_iteration(iteration: int, cfg: Config, state: RunState, chat, pool, logger) -> dict:
    """One PPO iteration; every random draw in it is seeded from (seed, rank, iteration), so a resume replays it."""
    rank = dist.rank()
    actor_critic, optimizer, kl_ctl, sampler = (
        state.actor_critic,
        state.optimizer,
        state.kl_ctl,
        state.sampler,
    )
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
    scores = score_rollouts(actor_critic, batch, cfg.micro_batch_size, cfg.temperature)
    kl_coef = kl_ctl.value
    targets = compute_advantages(batch, scores, cfg, kl_coef)
    update_start = time.perf_counter()
    train_policy = iteration >= cfg.critic_warmup_iterations
    stats = ppo_update(actor_critic, optimizer, batch, targets, cfg, generator, train_policy)
    update_seconds = time.perf_counter() - update_start
    episode_kl = (targets.kl * batch.action_mask).sum(dim=1)  # (B,) each episode's KL, summed over its tokens
    kl_sum, n_episodes, kl_tokens, n_tokens, gen_tokens, gen_seconds = dist.all_sum(
        [
            float(episode_kl.sum()),
            float(len(batch)),
            float((targets.kl * batch.action_mask).sum()),
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
    episodes = (
        play_greedy(actor_critic, cfg, shard, cfg.num_episodes, source=cfg.eval_tasks or "") if shard else []
    )
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
