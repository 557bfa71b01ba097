"""The tiny preset's recipe: a small Qwen3-shaped model built on the CPU from the mock server's train text, then
warm-started by imitation of the train tasks' oracle solutions. It sits above ``models`` (which only builds a
model from the texts it is given), ``env`` and ``mcp_mock``.

``prepare(cfg)`` is the step ``ppo.train`` shows: the base is built in seconds, the warm start takes minutes the
first time; both are cached (``$QWEN_TOOL_CACHE``).
"""

from __future__ import annotations

from pathlib import Path


def prepare(cfg) -> Path:
    """The tiny preset's model folder for ``cfg`` (warm-started unless ``--no-warmstart``), built when not cached.

    Under torchrun it is built once per node: local rank 0 builds, the node's other ranks wait for it and load it.
    """
    from ppo.infra.distributed import once_per_node

    return once_per_node(lambda: _build(cfg), lambda: cached(cfg))


def _build(cfg) -> Path:
    from ppo.tasks import resolve_tasks
    from ppo.tiny.build import ensure_tiny
    from ppo.tiny.warmstart import ensure_warm_start, imitated_tasks

    path = ensure_tiny()
    return (
        ensure_warm_start(path, cfg, resolve_tasks(imitated_tasks(cfg), "train")) if cfg.warmstart else path
    )


def cached(cfg) -> Path | None:
    """The folder ``prepare`` returns, once it is cached; None before."""
    from ppo.tiny.build import default_cache_dir
    from ppo.tiny.warmstart import warm_start_dir

    base = default_cache_dir()
    path = warm_start_dir(base, cfg) if cfg.warmstart else base
    return path if (base / "config.json").is_file() and (path / "config.json").is_file() else None
