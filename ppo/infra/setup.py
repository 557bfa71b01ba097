"""Building what a run needs from its Config: the policy, the optimizer and schedule, the tasks, the env pool."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ppo.infra.config import Config


def prepare_model(cfg: Config) -> str:
    """The model folder or hub id to load: ``--model`` when given, else the preset's. For the tiny preset this is a
    visible step of its own: the model is built locally and warm-started (``ppo.tiny.prepare``; cached, minutes
    the first time)."""
    if cfg.model:
        return cfg.model
    if cfg.preset == "tiny":
        from ppo import tiny

        return str(tiny.prepare(cfg))
    from ppo.infra.config import PRESETS

    return str(PRESETS[cfg.preset].model)


def default_device(cfg: Config) -> str:
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_policy(
    cfg: Config, adapters: str | Path | None = None, device: str | None = None, model_path: str | None = None
):
    """The ActorCritic of the run: one base (NF4 or full precision) with policy and critic adapters.

    ``model_path`` is what ``prepare_model(cfg)`` returned (called here when not given)."""
    from models import load_actor_critic

    model_path = model_path or prepare_model(cfg)
    if adapters is not None:
        check_adapter_base(cfg, adapters, model_path)
    device = device or default_device(cfg)
    actor_critic = load_actor_critic(
        model_path,
        quantization=cfg.quantization,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        critic=cfg.critic,
        gradient_checkpointing=cfg.gradient_checkpointing,
        device=device,
        compute_dtype=base_compute_dtype(cfg, device),
    )
    if adapters is not None:
        actor_critic.load_adapters(adapters)
    return actor_critic


def base_compute_dtype(cfg: Config, device: str) -> torch.dtype | None:
    """bf16 for the 4-bit base layers with ``--cpu-bf16-base`` on a CPU with bf16 units, else None (the model's
    dtype: fp32 on the CPU, bf16 on a GPU)."""
    from models.loading import cpu_has_bf16

    on_cpu = torch.device(device).type == "cpu"
    wanted = cfg.cpu_bf16_base and cfg.quantization == "nf4" and on_cpu
    return torch.bfloat16 if wanted and cpu_has_bf16() else None


def check_adapter_base(cfg: Config, adapters: str | Path, model_path: str) -> None:
    """Refuse adapters trained on another base than ``model_path``, the one the run's config leads to.

    A run's config written before a setting that chooses the base existed (``--tiny-copy-circuit``) reads back
    with that setting's default, and so leads to another base, under which the adapters would load without an
    error and play a different policy. Bases are compared by folder name (a tiny base's name holds the hash of
    its recipe; a moved cache keeps it). A base named with ``--model`` is the user's choice and is not checked.
    """
    from models.loading import saved_settings
    from ppo.infra.checkpoint import CheckpointError

    saved = None if cfg.model else saved_settings(adapters)
    trained_on = (saved or {}).get("name_or_path")
    if trained_on and Path(trained_on).name != Path(model_path).name:
        raise CheckpointError(
            f"the adapters in {adapters} were trained on the base {trained_on}, but the run's config leads to "
            f"{model_path} (a setting that chose the base may be missing from an older run's config); pass "
            f"--model {trained_on} to play them on their own base"
        )


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


def make_env_pool(cfg: Config, tasks: list[dict], size: int | None = None, source: str | None = None):
    """Envs for ``tasks``, which came from ``source`` (``--tasks``' value; default ``cfg.tasks``): it decides the
    server when ``--mcp-server`` is not given (``ppo.tasks.task_server``)."""
    from env import EnvPool
    from ppo.tasks import task_server

    return EnvPool(
        size or cfg.num_episodes,
        server=task_server(source if source is not None else cfg.tasks, cfg.mcp_server),
        tasks=tasks,
        max_turns=cfg.max_turns,
        call_timeout=cfg.call_timeout,
    )


def input_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "your input is wrong" (model, server, task file, checkpoint, run folder, a path):
    the command lines print them as one ``error:`` line instead of a traceback."""
    from env import ServerStartError, TaskError
    from models import ModelLoadError
    from ppo.infra.checkpoint import CheckpointError, RunFolderError
    from ppo.infra.config import ConfigError

    return (
        ModelLoadError, ServerStartError, TaskError, CheckpointError, RunFolderError, ConfigError, FileNotFoundError,
    )  # fmt: skip


def add_policy_arguments(parser) -> None:
    """The flags ``policy_config`` reads, for the commands that play a policy."""
    import argparse

    from ppo.infra.config import PRESETS

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
        "--tiny-copy-circuit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the tiny base wired to copy names or not (as ppo.train; default: the run's, or the preset's)",
    )
    parser.add_argument(
        "--max-new-tokens", type=_non_negative, default=0, help="per-turn token limit (default: the config's)"
    )
    parser.add_argument(
        "--max-context", type=_non_negative, default=0, help="episode token limit (default: the config's)"
    )


def _non_negative(text: str) -> int:
    """An argparse type: an integer >= 0 (0 keeps the config's value)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def policy_config(args) -> Config:
    """The config of a command that plays a policy (``ppo.evaluate``, ``ppo.chat``): the run's own config with
    ``--checkpoint`` (``args.checkpoint`` becomes the checkpoint folder), else ``--preset``'s; ``--model``,
    ``--mcp-server``, ``--device``, ``--tiny-copy-circuit``, ``--max-new-tokens`` and ``--max-context`` override it
    when given."""
    import dataclasses

    from ppo.infra.config import PRESETS, from_dict

    if args.checkpoint:
        from ppo.infra.checkpoint import latest_checkpoint, run_config

        checkpoint = latest_checkpoint(args.checkpoint)
        cfg = from_dict(run_config(checkpoint))
        args.checkpoint = str(checkpoint)
    else:
        cfg = dataclasses.replace(PRESETS[args.preset])
    for name in ("model", "mcp_server", "device"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.tiny_copy_circuit is not None:
        cfg.tiny_copy_circuit = args.tiny_copy_circuit
    if args.max_new_tokens:
        cfg.max_new_tokens = args.max_new_tokens
    if args.max_context:
        cfg.max_context = args.max_context
    cfg.validate()  # the overrides may not fit the rest (e.g. --max-new-tokens beyond the context)
    return cfg
