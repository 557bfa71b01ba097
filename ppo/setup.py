"""Building what a run needs from its Config: the policy, the optimizer and schedule, the tasks, the env pool."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ppo.config import Config


def resolve_model_path(cfg: Config) -> str:
    """The model to load: ``--model`` when given, else the preset's (tiny: built locally and warm-started).

    Under torchrun the tiny build runs once per node: local rank 0 builds the cache while the node's other
    ranks wait for it to appear and then load it (each building it too would take as long again on shared
    cores, and two writers of one cache folder corrupt it).
    """
    if cfg.model:
        return cfg.model
    if cfg.preset == "tiny":
        return str(_once_per_node(lambda: _build_tiny(cfg), lambda: _cached_tiny(cfg)))
    from ppo.config import PRESETS

    return str(PRESETS[cfg.preset].model)


def _build_tiny(cfg: Config) -> Path:
    """The tiny preset's model folder (warm-started unless ``--no-warmstart``), built when not cached."""
    from models.tiny import ensure_tiny
    from ppo.warmstart import ensure_warm_start

    path = ensure_tiny()
    return ensure_warm_start(path, cfg) if cfg.warmstart else path


def _cached_tiny(cfg: Config) -> Path | None:
    """The folder ``_build_tiny`` returns, once it is cached; None before."""
    from models.tiny import default_cache_dir
    from ppo.warmstart import warm_start_dir

    base = default_cache_dir()
    path = warm_start_dir(base, cfg) if cfg.warmstart else base
    return path if (base / "config.json").is_file() and (path / "config.json").is_file() else None


def _once_per_node(build, cached, poll_seconds: float = 2.0):
    """``build()`` on local rank 0; on the other ranks, wait until ``cached()`` returns a path.

    A rank 0 that fails ends the job (torchrun stops every worker when one exits with an error), so the wait
    needs no collective and no timeout, however long the build takes.
    """
    import os
    import time

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        return build()
    path, said = cached(), False
    while path is None:
        if not said:
            print(
                f"rank {os.environ.get('RANK', '?')}: waiting for local rank 0 to build the model", flush=True
            )
            said = True
        time.sleep(poll_seconds)
        path = cached()
    return path


def default_device(cfg: Config) -> str:
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_policy(cfg: Config, adapters: str | Path | None = None, device: str | None = None):
    """The ActorCritic of the run: one base (NF4 or full precision) with policy and critic adapters."""
    from models import load_actor_critic

    actor_critic = load_actor_critic(
        resolve_model_path(cfg),
        quantization=cfg.quantization,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        critic=cfg.critic,
        gradient_checkpointing=cfg.gradient_checkpointing,
        device=device or default_device(cfg),
    )
    if adapters is not None:
        actor_critic.load_adapters(adapters)
    return actor_critic


def build_optimizer(cfg: Config, actor_critic) -> torch.optim.Optimizer:
    """AdamW over two parameter groups: the policy adapter, and the critic (adapter and value head).

    The default is bitsandbytes' paged 8-bit AdamW: its moments take a quarter of fp32 Adam's memory and
    are paged out of GPU memory under pressure instead of failing.
    """
    groups = [
        {"params": actor_critic.policy_parameters(), "lr": cfg.learning_rate},
        {"params": actor_critic.critic_parameters(), "lr": cfg.critic_learning_rate},
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb

    kind = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return kind(groups, weight_decay=cfg.weight_decay)


def lr_factor(cfg: Config, iteration: int) -> float:
    """Learning-rate multiplier at ``iteration``: linear warmup, then constant, linear or cosine to 10%."""
    if iteration < cfg.warmup_iterations:
        return (iteration + 1) / (cfg.warmup_iterations + 1)
    span = max(cfg.iterations - cfg.warmup_iterations, 1)
    progress = min((iteration - cfg.warmup_iterations) / span, 1.0)
    if cfg.lr_schedule == "linear":
        return 1.0 - 0.9 * progress
    if cfg.lr_schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(cfg: Config, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))


def resolve_tasks(path: str | None, split: str) -> list[dict]:
    """Tasks from a JSONL file (line-numbered errors), or the bundled mock server's split."""
    from env.tasks import load_tasks

    if path:
        return load_tasks(path)
    import mcp_mock

    return load_tasks(mcp_mock.load_tasks(split))


def make_env_pool(cfg: Config, tasks: list[dict], size: int | None = None):
    from env import EnvPool

    return EnvPool(
        size or cfg.num_episodes,
        server=cfg.mcp_server,
        tasks=tasks,
        max_turns=cfg.max_turns,
        call_timeout=cfg.call_timeout,
    )


def input_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "your input is wrong" (model, server, task file, checkpoint, run folder, a path):
    the command lines print them as one ``error:`` line instead of a traceback."""
    from env import ServerStartError, TaskError
    from models import ModelLoadError
    from ppo.checkpoint import CheckpointError, RunFolderError

    return (ModelLoadError, ServerStartError, TaskError, CheckpointError, RunFolderError, FileNotFoundError)


def add_policy_arguments(parser) -> None:
    """The flags ``policy_config`` reads, for the commands that play a policy."""
    from ppo.config import PRESETS

    parser.add_argument(
        "--checkpoint", help="a checkpoint folder or a run's output directory (its newest checkpoint)"
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="without --checkpoint")
    parser.add_argument("--model", help="base model name or path (default: the run's or the preset's)")
    parser.add_argument(
        "--mcp-server", dest="mcp_server", help="MCP server command or URL (default: the mock)"
    )
    parser.add_argument("--device", help="torch device")
    parser.add_argument(
        "--max-new-tokens", type=int, default=0, help="per-turn token limit (default: the config's)"
    )


def policy_config(args) -> Config:
    """The config of a command that plays a policy (``ppo.evaluate``, ``ppo.chat``): the run's own config with
    ``--checkpoint`` (``args.checkpoint`` becomes the checkpoint folder), else ``--preset``'s; ``--model``,
    ``--mcp-server``, ``--device`` and ``--max-new-tokens`` override it when given."""
    import dataclasses

    from ppo.config import PRESETS, from_dict

    if args.checkpoint:
        from ppo.checkpoint import latest_checkpoint, run_config

        checkpoint = latest_checkpoint(args.checkpoint)
        cfg = from_dict(run_config(checkpoint))
        args.checkpoint = str(checkpoint)
    else:
        cfg = dataclasses.replace(PRESETS[args.preset])
    for name in ("model", "mcp_server", "device"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.max_new_tokens:
        cfg.max_new_tokens = args.max_new_tokens
    return cfg
