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
    from ppo.tiny.build import ensure_tiny
    from ppo.tiny.warmstart import warm_start_dir

    path = ensure_tiny(copy_circuit=cfg.tiny_copy_circuit)
    if not cfg.warmstart:
        return path
    out = warm_start_dir(path, cfg)
    if not (out / "config.json").is_file():
        _warm_start_in_own_process(cfg)
        if not (out / "config.json").is_file():
            raise RuntimeError(f"the warm start process finished without writing {out}")
    return out


def _warm_start_in_own_process(cfg) -> None:
    """Build the warm start in a fresh interpreter (``python -m ppo.tiny.warmstart CONFIG``), which exits when done.

    Its full fine-tuning (fp32 weights, AdamW states) left the trainer's own process 40% slower in the PPO that
    followed: 5 iterations took 226 s after it in the same process and 161 s in a fresh one, on identical episodes.
    A new interpreter, not a fork (threads) nor multiprocessing's spawn (which re-runs the caller's main script)."""
    import json
    import subprocess
    import sys

    from ppo.infra.config import to_dict

    done = subprocess.run([sys.executable, "-m", "ppo.tiny.warmstart", json.dumps(to_dict(cfg))], check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"the warm start failed (exit status {done.returncode}; its error is printed above)"
        )


def cached(cfg) -> Path | None:
    """The folder ``prepare`` returns, once it is cached; None before."""
    from ppo.tiny.build import default_cache_dir
    from ppo.tiny.warmstart import warm_start_dir

    base = default_cache_dir(cfg.tiny_copy_circuit)
    path = warm_start_dir(base, cfg) if cfg.warmstart else base
    return path if (base / "config.json").is_file() and (path / "config.json").is_file() else None
