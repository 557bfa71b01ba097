"""The `tiny` preset: a randomly initialised Qwen3-shaped model plus a locally trained tokenizer.

It is built on the CPU with no network, saved like any Hugging Face checkpoint, and then loaded through
the same `from_pretrained` path as Qwen3-1.7B, so CPU tests exercise the real loading code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Bump when the architecture, tokenizer recipe or template changes, so old caches are not reused.
TINY_VERSION = "v3"

TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "intermediate_size": 768,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}


def default_cache_dir() -> Path:
    """Return where `ensure_tiny` keeps the built model: `$QWEN_TOOL_CACHE/tiny-<version>`.

    `$QWEN_TOOL_CACHE` defaults to `~/.cache/qwen-tool`.
    """
    root = os.environ.get("QWEN_TOOL_CACHE") or Path.home() / ".cache" / "qwen-tool"
    return Path(root) / f"tiny-{TINY_VERSION}-{fingerprint()}"


def fingerprint() -> str:
    """A short hash of everything the tiny build reads, so a changed task suite or template is rebuilt."""
    import hashlib

    from models import corpus, tokenizer

    digest = hashlib.sha256(repr((TINY_VERSION, TINY_CONFIG, tokenizer.TINY_SPLIT_PATTERN)).encode())
    digest.update(tokenizer.chat_template().encode())
    tasks_dir = corpus._mock_tasks_dir()
    for name in corpus.TRAIN_FILES if tasks_dir is not None else ():
        path = tasks_dir / name
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:8]


def _save_model(out_dir: Path, tokenizer, seed: int, overrides: dict[str, Any]) -> None:
    """Create the random-init Qwen3ForCausalLM sized to the tokenizer and save it to `out_dir`."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    settings = {**TINY_CONFIG, **overrides}
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **settings,
    )
    # The generator is seeded locally so building never disturbs the caller's global RNG stream.
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).float().eval()
    finally:
        torch.random.set_rng_state(state)
    model.generation_config = GenerationConfig(eos_token_id=[eos_id, pad_id], pad_token_id=pad_id)
    model.save_pretrained(out_dir)


def build_tiny(
    out_dir: str | Path,
    seed: int = 0,
    *,
    vocab_size: int = 4096,
    texts: list[str] | None = None,
    **config_overrides: Any,
) -> Path:
    """Build the tiny model and its tokenizer into `out_dir` (created; must not hold another model).

    `config_overrides` replace entries of `TINY_CONFIG` (e.g. `hidden_size=128` for faster tests);
    `texts` replaces the tokenizer's training corpus. Returns `out_dir`.
    """
    from models.tokenizer import train_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save_pretrained(out)
    _save_model(out, tokenizer, seed, config_overrides)
    return out


def ensure_tiny(cache_dir: str | Path | None = None) -> Path:
    """Return the folder of the tiny model, building it first if it is not cached yet.

    The build goes to a temporary sibling folder that is renamed into place at the end, so a crash never
    leaves a half-built cache and concurrent builders do not see each other's partial files.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny(tmp)
        if target.exists() and not (target / "config.json").is_file():
            shutil.rmtree(target)  # an empty or foreign leftover, not a finished build
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its finished build into place first; theirs is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
