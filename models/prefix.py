"""Shared-prefix forward passes: run the prefix every row has in common once, not once per row.

Shapes: B rows, T token positions, P shared-prefix length, H hidden size.

In tool-calling PPO every episode opens with the same system turn (the tool schemas) and the same
``<|im_start|>user`` line, often most of the episode's tokens. Running that prefix once (batch 1) and
letting every row attend to its keys and values through the KV cache gives the same hidden states as the
full batch pass (causal attention: prefix positions never see what follows them), at a fraction of the cost.
Gradients are exact too: the prefix's keys and values are expanded, not copied, so the backward pass sums
every row's gradient into the single prefix computation.

Packing: after the prefix, rows differ in length (a two-turn episode beside a six-turn one), and padding them
to the longest one doubles the tokens a batch computes. ``hidden_with_shared_prefix`` therefore packs the rows'
remainders (their suffixes) end to end into as few rows as hold the longest one, with a block-diagonal causal
mask: a token sees the prefix and the earlier tokens of its own row, nothing of the rows packed beside it, and
keeps the position it had. The result is scattered back to the caller's (B, T) layout, so it is the padded pass's
output, computed on about half the tokens (the warm start's batches pad 2.1x).

Not used under activation checkpointing with gradients: a checkpointed layer re-runs its forward in the
backward pass, and the KV cache would then be appended to twice.
"""

from __future__ import annotations

import inspect

import torch

from models.scoring import position_ids_from_mask

# Below this many shared tokens the second forward call costs more than it saves.
MIN_SHARED_PREFIX = 16


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Length of the longest prefix that is real (unpadded) and identical in every row, at most T - 1."""
    same = (input_ids == input_ids[:1]) & attention_mask.bool()  # (B, T)
    length = int(same.all(dim=0).long().cumprod(dim=0).sum())
    return min(length, input_ids.shape[1] - 1)


def cache_argument(model) -> str:
    """Name of the KV-cache argument of ``model.forward`` (a peft wrapper is looked through): transformers 5
    calls it ``cache``; 4.x called it ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def new_cache(config):
    """An empty ``DynamicCache`` for a model of ``config``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers before 4.56 builds its layers lazily, without a config
        return DynamicCache()


def _layer_kv(cache, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[index].keys, cache.layers[index].values
    return cache.key_cache[index], cache.value_cache[index]


def pack_rows(lengths: list[int]) -> list[list[int]]:
    """Rows (by index) grouped into bins no longer than the longest row, first fit by decreasing length.

    First-fit decreasing uses at most 11/9 of the optimal number of bins plus one (Johnson 1973); here the bins
    only need to be few and full, so that the packed batch carries little padding.
    """
    capacity = max(lengths, default=0)
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        if lengths[row] == 0:
            continue
        for k, free in enumerate(room):
            if lengths[row] <= free:
                bins[k].append(row)
                room[k] -= lengths[row]
                break
        else:
            bins.append([row])
            room.append(capacity - lengths[row])
    return bins


def packed_layout(attention_mask: torch.Tensor, prefix_len: int):
    """Where each row's suffix goes when the suffixes are packed (``pack_rows``).

    attention_mask (B, T), right padded after the prefix. Returns (rows, cols, packed_rows, packed_cols,
    segment): a real suffix token at (rows[i], cols[i]) of the batch goes to (packed_rows[i], packed_cols[i]) of
    the (R, W) packed batch, and ``segment`` (R, W) names the batch row each packed position comes from (-1 on
    padding).
    """
    suffix = attention_mask[:, prefix_len:].bool()  # (B, S)
    lengths = suffix.sum(dim=1)  # (B,)
    if not torch.equal(suffix, torch.arange(suffix.shape[1]) < lengths[:, None]):
        raise ValueError("packing needs rows that are right padded after the shared prefix")
    bins = pack_rows(lengths.tolist())
    width = max((int(lengths[b].sum()) for b in bins), default=0)
    segment = torch.full((len(bins), width), -1, dtype=torch.long)
    rows, cols, packed_rows, packed_cols = [], [], [], []
    for r, members in enumerate(bins):
        at = 0
        for b in members:
            n = int(lengths[b])
            segment[r, at : at + n] = b
            rows.append(torch.full((n,), b))
            cols.append(torch.arange(prefix_len, prefix_len + n))
            packed_rows.append(torch.full((n,), r))
            packed_cols.append(torch.arange(at, at + n))
            at += n
    return *(torch.cat(x) for x in (rows, cols, packed_rows, packed_cols)), segment


def _packed_mask(segment: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """(R, 1, W, P + W) bool attention mask of a packed batch: every position sees the prefix, and a real token
    the tokens of its own segment up to itself. A padding position sees only the prefix (no empty softmax)."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (W, W)
    own = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0) & causal  # (R, W, W)
    prefix = own.new_ones((*own.shape[:2], prefix_len))  # (R, W, P)
    return torch.cat([prefix, own], dim=-1).unsqueeze(1)


def _prefix_cache(decoder, prefix_ids: torch.Tensor, batch: int):
    """Final hidden states (1, P, H) of the prefix, and its KV cache expanded (not copied) to ``batch`` rows."""
    name = cache_argument(decoder)
    prefix = decoder(input_ids=prefix_ids, use_cache=True)  # (1, P, H) and its KV cache
    prefix_cache = prefix.cache if name == "cache" else prefix.past_key_values
    cache = new_cache(decoder.config)
    for index in range(len(decoder.layers)):
        keys, values = _layer_kv(prefix_cache, index)
        cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), index)
    return prefix.last_hidden_state, {name: cache}


def hidden_with_shared_prefix(
    decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_len: int, *, pack: bool = True
) -> torch.Tensor:
    """Final hidden states (B, T, H) of ``decoder`` (a transformers base model), the first ``prefix_len``
    positions computed once for all rows.

    With ``pack`` (right-padded rows) the rows' suffixes are packed (module docstring) and the hidden states are
    zero on padding; without it the suffixes run padded, and padding holds whatever the model computed there.
    """
    batch, total = input_ids.shape
    if pack:
        rows, cols, packed_rows, packed_cols, segment = packed_layout(attention_mask, prefix_len)
        head, cache = _prefix_cache(decoder, input_ids[:1, :prefix_len], segment.shape[0])
        packed_ids = input_ids.new_zeros(segment.shape).index_put(
            (packed_rows, packed_cols), input_ids[rows, cols]
        )
        positions = packed_ids.new_zeros(segment.shape).index_put((packed_rows, packed_cols), cols)
        rest = decoder(
            input_ids=packed_ids,  # (R, W)
            attention_mask=_packed_mask(segment, prefix_len),  # (R, 1, W, P + W)
            position_ids=positions,  # (R, W): each token keeps its position in its own row
            use_cache=True,
            **cache,
        ).last_hidden_state  # (R, W, H)
        suffix = rest.new_zeros((batch, total - prefix_len, rest.shape[-1]))  # (B, T - P, H), zero on padding
        suffix = suffix.index_put((rows, cols - prefix_len), rest[packed_rows, packed_cols])
        return torch.cat([head.expand(batch, prefix_len, -1), suffix], dim=1)  # (B, T, H)
    head, cache = _prefix_cache(decoder, input_ids[:1, :prefix_len], batch)
    rest = decoder(
        input_ids=input_ids[:, prefix_len:],
        attention_mask=attention_mask,  # (B, T): the cache's P columns, then the rows' own tokens
        position_ids=position_ids_from_mask(attention_mask)[:, prefix_len:],
        use_cache=True,
        **cache,
    )
    return torch.cat([head.expand(batch, prefix_len, -1), rest.last_hidden_state], dim=1)  # (B, T, H)
