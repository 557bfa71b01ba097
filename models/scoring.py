"""Token-aligned log-probabilities, entropies and values from hidden states, in chunks over T.

Shapes: B rows, T token positions, H hidden size, V vocabulary, C chunk length.

Alignment contract (everything is indexed by the token it describes): `out[:, t]` comes from the hidden
state at `t - 1`, which saw `input_ids[:, :t]`; `out[:, 0] = 0`, and so is every position whose token or
predecessor is padding (with left padding the first real token has no context, exactly as at t=0).
"""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return (B, T) position ids that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def scored_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Return a (B, T) bool mask of positions that have a real token and a real predecessor."""
    real = attention_mask.bool()
    prev = torch.zeros_like(real)
    prev[:, 1:] = real[:, :-1]
    return real & prev


def _scaled_logits(hidden, weight, bias, temperature: float) -> torch.Tensor:
    """fp32 ``lm_head(hidden) / temperature``, (B, C, V); no division at temperature 1."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return logits / temperature if temperature != 1.0 else logits


def _chunk_forward(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob of `targets`, entropy and log-sum-exp under softmax(lm_head(hidden) / temperature), fp32.

    hidden (B, C, H), targets (B, C) -> three (B, C) tensors (the entropy is zeros when not asked for). With
    z = logits / temperature and m = logsumexp(z): log p(y) = z_y - m, H = m - sum_i p_i z_i.
    """
    logits = _scaled_logits(hidden, weight, bias, temperature)  # (B, C, V)
    lse = torch.logsumexp(logits, dim=-1)  # (B, C)
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return token_logp, torch.zeros_like(token_logp), lse
    entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return token_logp, entropy, lse


class _ChunkStats(torch.autograd.Function):
    """``_chunk_forward`` with a closed-form backward, so no (B, C, V) tensor outlives either pass.

    Forward keeps only the inputs and two (B, C) tensors; backward recomputes the chunk's logits (one matmul) and
    forms their gradient at once instead of through autograd's chain of vocabulary-sized intermediates:
    d log p(y) / dz_j = [j = y] - p_j and dH / dz_j = -p_j (log p_j + H) (z = logits / temperature).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy):
        token_logp, entropy, lse = _chunk_forward(hidden, targets, weight, bias, temperature, with_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        return token_logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        logits = _scaled_logits(hidden, weight, bias, ctx.temperature)
        logp = logits.sub_(lse.unsqueeze(-1))  # (B, C, V), in place: the fewest vocabulary-sized passes
        p = logp.exp()
        if ctx.with_entropy:
            # -g_lp p_j - g_H p_j (log p_j + H) = p_j (c - g_H log p_j) with c = -(g_lp + g_H H)
            coef = (grad_logp + grad_entropy * entropy).neg_().unsqueeze(-1)
            grad_z = logp.mul_(grad_entropy.neg().unsqueeze(-1)).add_(coef).mul_(p)
        else:
            grad_z = p.mul_(grad_logp.neg().unsqueeze(-1))
        grad_z.scatter_add_(-1, targets.unsqueeze(-1), grad_logp.unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad_z.div_(ctx.temperature)
        grad_z = grad_z.to(hidden.dtype)  # what the logits' .float() passes back to the matmul
        grad_hidden = grad_z @ weight if ctx.needs_input_grad[0] else None
        flat_z = grad_z.flatten(0, 1)
        grad_weight = flat_z.T @ hidden.flatten(0, 1) if ctx.needs_input_grad[1] else None
        grad_bias = flat_z.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


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
    under autograd each chunk's backward recomputes its logits (``_ChunkStats``) instead of keeping them.
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
        if grad:
            lp, ent = _ChunkStats.apply(h, weight, bias, y, temperature, with_entropy)
        else:
            lp, ent, _ = _chunk_forward(h, y, weight, bias, temperature, with_entropy)
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
