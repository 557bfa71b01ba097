"""Token-aligned log-probabilities, entropies and values from hidden states, in chunks over T.

Shapes: B rows, T token positions, H hidden size, V vocabulary, C chunk length.

Alignment contract (everything is indexed by the token it describes): `out[:, t]` comes from the hidden
state at `t - 1`, which saw `input_ids[:, :t]`; `out[:, 0] = 0`, and so is every position whose token or
predecessor is padding (with left padding the first real token has no context, exactly as at t=0).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return (B, T) position ids that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def scored_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return a (B, T) bool mask of positions that have a real token and a real predecessor."""
    real = attention_mask.bool()
    prev = torch.zeros_like(real)
    prev[:, 1:] = real[:, :-1]
    return real & prev


def _chunk_stats(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `targets` and entropy under softmax(lm_head(hidden) / temperature), fp32.

    hidden (B, C, H), targets (B, C) -> two (B, C) tensors (the entropy is zeros when not asked for).
    """
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature  # (B, C, V)
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, C)
    if not with_entropy:
        return token_logp, torch.zeros_like(token_logp)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, C)
    return token_logp, entropy


def token_logprobs(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    lm_head: torch.nn.Module,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 512,
) -> dict[str, torch.Tensor]:
    """Return {"logprobs": (B, T)} (and "entropy": (B, T)) aligned to `input_ids`, see module docstring.

    hidden (B, T, H) are the final hidden states. The (B, C, V) fp32 logits of one chunk exist at a time;
    under autograd each chunk is checkpointed, so backward recomputes it instead of keeping all of them.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive to score tokens, got {temperature}.")
    if hidden.shape[:2] != input_ids.shape or input_ids.shape != attention_mask.shape:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, ids {tuple(input_ids.shape)}.")
    B, T = input_ids.shape
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    grad = torch.is_grad_enabled()
    lp_parts, ent_parts = [], []
    for start in range(0, T - 1, chunk_size):
        stop = min(start + chunk_size, T - 1)
        h, y = hidden[:, start:stop], input_ids[:, start + 1 : stop + 1]  # logits at t-1 predict t
        args = (h, y, weight, bias, temperature, with_entropy)
        lp, ent = checkpoint(_chunk_stats, *args, use_reentrant=False) if grad else _chunk_stats(*args)
        lp_parts.append(lp)
        ent_parts.append(ent)
    zero = hidden.new_zeros((B, 1), dtype=torch.float32)
    keep = scored_mask(attention_mask)
    # torch.where, not a product: pad positions may hold NaN from fully masked attention rows.
    logprobs = torch.where(keep, torch.cat([zero, *lp_parts], dim=1), 0.0)  # (B, T)
    out = {"logprobs": logprobs}
    if with_entropy:
        out["entropy"] = torch.where(keep, torch.cat([zero, *ent_parts], dim=1), 0.0)  # (B, T)
    return out


def token_values(
    hidden: torch.Tensor, attention_mask: torch.Tensor, value_head: torch.nn.Module
) -> torch.Tensor:
    """Return (B, T) values where values[:, t] = value_head(hidden[:, t - 1]) in fp32, 0 where unscored."""
    B, _ = attention_mask.shape
    head_dtype = value_head.weight.dtype
    v = value_head(hidden[:, :-1].to(head_dtype)).squeeze(-1).float()  # (B, T-1)
    values = torch.cat([v.new_zeros((B, 1)), v], dim=1)  # (B, T)
    return torch.where(scored_mask(attention_mask), values, 0.0)
