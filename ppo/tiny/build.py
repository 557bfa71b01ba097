"""The tiny model's cache: where it lives, what its key hashes, and building it once."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Bump when the architecture, tokenizer recipe or template changes, so old caches are not reused.
TINY_VERSION = "v3"


def default_cache_dir(copy_circuit: bool = False) -> Path:
    """Where `ensure_tiny` keeps the built model: `$QWEN_TOOL_CACHE/tiny-<version>-<fingerprint>`.

    `$QWEN_TOOL_CACHE` defaults to `~/.cache/qwen-tool`.
    """
    root = os.environ.get("QWEN_TOOL_CACHE") or Path.home() / ".cache" / "qwen-tool"
    return Path(root) / f"tiny-{TINY_VERSION}-{fingerprint(copy_circuit)}"


def fingerprint(copy_circuit: bool = False) -> str:
    """A short hash of everything the tiny build reads, so a changed task suite or template is rebuilt."""
    from models.tiny import COPY_CIRCUIT, COPY_CIRCUIT_CONFIG, TINY_CONFIG
    from models.tokenizer import TINY_SPLIT_PATTERN, chat_template
    from ppo.tiny.corpus import train_task_files

    recipe = (TINY_VERSION, TINY_CONFIG, TINY_SPLIT_PATTERN)
    if copy_circuit:
        recipe += ("copy-circuit-6", COPY_CIRCUIT, COPY_CIRCUIT_CONFIG)
    digest = hashlib.sha256(repr(recipe).encode())
    digest.update(chat_template().encode())
    for path in train_task_files():
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:8]


def ensure_tiny(cache_dir: str | Path | None = None, copy_circuit: bool = False) -> Path:
    """The folder of the tiny model (``copy_circuit``: wired to copy names, ``models.tiny.wire_copying``), built
    first (atomically) when it is not cached yet.

    The build goes to a temporary sibling folder renamed into place at the end, so a crash never leaves a
    half-built cache; a finished build that appeared meanwhile (another process) is kept."""
    from models.tiny import build_tiny
    from ppo.infra.checkpoint import write_folder_atomically
    from ppo.tiny.corpus import tokenizer_texts

    target = Path(cache_dir) if cache_dir is not None else default_cache_dir(copy_circuit)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_folder_atomically(
        target, lambda tmp: build_tiny(tmp, tokenizer_texts(), copy_circuit=copy_circuit), keep_existing=True
    )
