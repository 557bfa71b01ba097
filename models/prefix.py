"""Shared-prefix forward passes: run the prefix every row has in common once, not once per row.

Shapes: B rows, T token positions, P shared-prefix length, H hidden size.

In tool-calling PPO every episode opens with the same system turn (the tool schemas) and the same
``<|im_start|>user`` line, often most of the episode's tokens. Running that prefix once (batch 1) and
letting every row attend to its keys and values through the KV cache gives the same hidden states as the
full batch pass (causal attention: prefix positions never see what follows them), at a fraction of the cost.
Gradients are exact too: the prefix's keys and values are expanded, not copied, so the backward pass sums
every row's gradient into the single prefix computation.

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


def hidden_with_shared_prefix(
    decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_len: int
) -> torch.Tensor:
    """Final hidden states (B, T, H) of ``decoder`` (a transformers base model), the first ``prefix_len``
    positions computed once for all rows."""
    batch = input_ids.shape[0]
    name = cache_argument(decoder)
    prefix = decoder(input_ids=input_ids[:1, :prefix_len], use_cache=True)  # (1, P, H) and its KV cache
    prefix_cache = prefix.cache if name == "cache" else prefix.past_key_values
    cache = new_cache(decoder.config)
    for index in range(len(decoder.layers)):
        keys, values = _layer_kv(prefix_cache, index)
        cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), index)
    rest = decoder(
        input_ids=input_ids[:, prefix_len:],
        attention_mask=attention_mask,  # (B, T): the cache's P columns, then the rows' own tokens
        position_ids=position_ids_from_mask(attention_mask)[:, prefix_len:],
        use_cache=True,
        **{name: cache},
    )
    head = prefix.last_hidden_state.expand(batch, prefix_len, -1)  # (B, P, H)
    return torch.cat([head, rest.last_hidden_state], dim=1)  # (B, T, H)
