"""The `tiny` preset: a randomly initialised Qwen3-shaped model plus a locally trained tokenizer.

It is built on the CPU with no network, saved like any Hugging Face checkpoint, and then loaded through
the same `from_pretrained` path as Qwen3-1.7B, so CPU tests exercise the real loading code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    out_dir: str | Path, texts: list[str], seed: int = 0, *, vocab_size: int = 4096, **config_overrides: Any
) -> Path:
    """Build the tiny model, with a tokenizer trained on ``texts``, into `out_dir` (created). Returns `out_dir`.

    `config_overrides` replace entries of `TINY_CONFIG` (e.g. `hidden_size=128` for faster tests). Caching, and
    which texts, are the recipe's (``ppo.tiny``).
    """
    from models.tokenizer import train_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save_pretrained(out)
    _save_model(out, tokenizer, seed, config_overrides)
    return out
