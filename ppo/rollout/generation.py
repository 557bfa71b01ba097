"""Sampling one assistant turn for a batch of contexts with the model's own forward: the ``loop`` engine.

Rollouts run `ppo.rollout.engine.StaticEngine` by default (a KV cache kept across turns, CUDA graphs); this loop is the
engine for architectures it does not cover (``--engine loop``) and the reference its tests compare against.
`merged_copy` here also builds the static engine's sampling copy.

Letters: B rows (episodes still playing), T token positions, V vocabulary.

`generate_turn` is a hand-written decoding loop instead of Hugging Face ``generate``, for three measured reasons
(``python -m ppo.bench`` prints the comparison):

- a row that wrote its end-of-turn token leaves the batch *and* the KV cache at once
  (``DynamicCache.batch_select_indices``), so short turns stop costing compute while long ones finish;
- the logits of the last position only are computed (``logits_to_keep=1``), never the (B, T, V) prefill logits;
- no logits processors: the next token is drawn from ``softmax(logits / temperature)`` over the full vocabulary
  (no top-k, no top-p), the distribution whose log-probs PPO recomputes at the same temperature.

With ``merge_lora`` the loop runs on a throw-away copy of the base with the active LoRA adapter merged into
dequantized weights: one dense matmul per linear layer and step instead of a 4-bit dequantization plus two LoRA
matmuls. The copy is rebuilt on every call (the adapters change after each update) and freed when the call
returns. The default (``None``) merges when the base holds 4-bit weights and runs on the CPU: there the step of
the tiny preset fell from 13.2 ms to 5.3 ms (16 rows, one thread), the copy's extra memory (the dense base)
lives only while a turn is sampled, and in fp32 the copy computes the policy's distribution to rounding. On a
GPU this loop does not merge: on an H100 (Qwen3-1.7B shape, 32 rows) merging gained it 4% (340 against 326
tokens/s), launch overhead being its bound. The static engine (`ppo.rollout.engine`) does merge on a GPU, where it buys
50%; there the bench measured the sampler's log-probs 0.031 nats per token from the policy's when merged and
0.029 unmerged, so the bf16 rounding of the merge is a small part of the gap between any bf16 sampler and the
scoring pass (0.018 for this loop, unmerged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.prefix import cache_argument, new_cache
from models.scoring import position_ids_from_mask


@dataclass
class TurnSample:
    """What `sample_turn` drew: each row's new ids and the sampler's log-prob of each of them."""

    tokens: list[list[int]]
    """new ids of each row, up to and including the end-of-turn token (absent when the row ran out of tokens)"""
    logprobs: list[list[float]]
    """log softmax(logits / temperature) of each sampled id (greedy: at temperature 1), parallel to `tokens`"""


def left_pad(contexts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (B, T) ``input_ids`` and ``attention_mask`` (long) tensors."""
    if not contexts or any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least one token to generate from.")
    width = max(len(c) for c in contexts)
    input_ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ctx in enumerate(contexts):
        input_ids[row, width - len(ctx) :] = torch.tensor(ctx, dtype=torch.long)
        attention_mask[row, width - len(ctx) :] = 1
    return input_ids, attention_mask


def _next_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one id per row from (B, V) logits; return the ids (B,) and their log-probs (B,), fp32."""
    logp = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)  # (B, V)
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def _decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    end_of_turn_id: int,
    generator: torch.Generator | None,
) -> TurnSample:
    """The decoding loop over a left-padded (B, T) batch, see the module docstring."""
    batch = input_ids.shape[0]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    logprobs: list[list[float]] = [[] for _ in range(batch)]
    alive = torch.arange(batch)  # original row of each row still in the batch
    positions = position_ids_from_mask(attention_mask)  # (B, T)
    cache = new_cache(model.config)
    cache_kw = {cache_argument(model): cache}
    step_ids, step_pos = input_ids, positions
    for step in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=step_pos,
            use_cache=True,
            logits_to_keep=1,
            **cache_kw,
        )
        new, new_logp = _next_tokens(out.logits[:, -1], temperature, generator)  # (B,), (B,)
        for row, tok, lp in zip(alive.tolist(), new.tolist(), new_logp.tolist(), strict=True):
            tokens[row].append(tok)
            logprobs[row].append(lp)
        if step + 1 == max_new_tokens:
            break
        keep = (new != end_of_turn_id).nonzero().squeeze(-1)  # (B',) rows still writing
        if keep.numel() == 0:
            break
        if keep.numel() < alive.numel():
            # Finished rows leave the batch and the cache: later steps cost only the rows still writing.
            cache.batch_select_indices(keep)
            alive, new, attention_mask = alive[keep.cpu()], new[keep], attention_mask[keep]
            step_pos = step_pos[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((alive.numel(), 1))], dim=1)
        step_ids, step_pos = new.unsqueeze(-1), step_pos[:, -1:] + 1  # (B, 1) each
    return TurnSample(tokens, logprobs)


def sample_turn(
    model: nn.Module,
    contexts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    end_of_turn_id: int,
    pad_id: int,
    merge_lora: bool | None = None,
    generator: torch.Generator | None = None,
) -> TurnSample:
    """Sample one turn per context and keep the sampler's log-probs (see `generate_turn` for the arguments).

    ``generator`` seeds the draws (on the model's device) without touching the global RNG.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(contexts, pad_id)
    if merge_lora is None:
        params = list(model.parameters())
        on_cpu = params[0].device.type == "cpu"
        merge_lora = on_cpu and any(type(p).__name__ == "Params4bit" for p in params)
    runner = merged_copy(model) if merge_lora else model
    was_training = runner.training
    runner.eval()  # dropout off, and gradient checkpointing (train mode only) would switch the cache off
    try:
        return _decode(
            runner,
            input_ids.to(device),
            attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            end_of_turn_id=end_of_turn_id,
            generator=generator,
        )
    finally:
        runner.train(was_training)


def generate_turn(
    model: nn.Module,
    contexts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    end_of_turn_id: int,
    pad_id: int,
    merge_lora: bool | None = None,
) -> list[list[int]]:
    """Sample one turn for each context: left-padded batched generation with the KV cache.

    Returns each row's new ids, up to and including the end-of-turn token (absent when the row ran out of
    ``max_new_tokens``). ``temperature == 0`` is greedy decoding. Sampling uses the full distribution (no top-k,
    no top-p), so the log-probs the update recomputes at the same temperature are those of the sampler.
    ``merge_lora`` runs on a merged, dequantized copy of the active adapter and base (see `merged_copy`); None
    merges when the base is 4-bit and on the CPU (see the module docstring for the measurements).
    """
    sample = sample_turn(
        model,
        contexts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        end_of_turn_id=end_of_turn_id,
        pad_id=pad_id,
        merge_lora=merge_lora,
    )
    return sample.tokens


@torch.no_grad()
def merged_copy(model: nn.Module, *, merge_adapters: bool = True) -> nn.Module:
    """A plain causal LM equal to `model`'s active role: base weights dequantized, active LoRA adapter merged in.

    `model` is a PeftModel (NF4 or full-precision base) or a plain causal LM (returned as is when nothing is
    quantized and no adapter is present). Every weight of the copy is in the compute dtype of the base; tensors
    that need no change are shared with `model`, not copied. ``merge_adapters=False`` leaves the adapters out:
    the copy is the dequantized base (`ppo.rollout.engine` adds the adapters back unmerged).
    """
    from transformers import AutoModelForCausalLM

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    merged, dtype = _merged_state(base, merge_adapters)
    if merged is None:
        return model
    config = base.config.__class__.from_dict(base.config.to_dict())
    config.quantization_config = None
    # Built on the meta device: no random initialisation, no second full-size allocation before the assignment.
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = copy.load_state_dict(merged, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(
            f"merging the adapter into a plain copy left weights unset: {sorted(result.missing_keys)[:3]}"
        )
    copy.tie_weights()
    # Buffers (e.g. the rotary inverse frequencies, not in any state dict) are shared with the base.
    shared = dict(base.named_buffers())
    for name, _ in list(copy.named_buffers()):
        if name in shared:
            owner, _, leaf = name.rpartition(".")
            setattr(copy.get_submodule(owner), leaf, shared[name])
    if any(t.is_meta for t in (*copy.parameters(), *copy.buffers())):
        raise RuntimeError("merging the adapter into a plain copy left tensors on the meta device.")
    return copy.eval()


def _merged_state(
    base: nn.Module, merge_adapters: bool
) -> tuple[dict[str, torch.Tensor] | None, torch.dtype]:
    """State dict of the merged copy (names of the plain model), or None when `model` needs no merging."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    lora_layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    quantized = any(type(p).__name__ == "Params4bit" for p in base.parameters())
    if not lora_layers and not quantized:
        return None, base.dtype
    dtype = compute_dtype(base)
    state: dict[str, torch.Tensor] = {}
    for name, module in lora_layers.items():
        # Detached: the copy may share storage with the policy, never its Parameter objects.
        weight = dequantize_module_weight(module.get_base_layer()).detach().to(dtype)
        # With adapters disabled (the reference role) the copy is the bare base.
        if merge_adapters and not module.disable_adapters and not module.merged:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).to(dtype)
        state[f"{name}.weight"] = weight
        bias = module.get_base_layer().bias
        if bias is not None:
            state[f"{name}.bias"] = bias.detach().to(dtype)
    inside = tuple(f"{name}." for name in lora_layers)
    for name, param in base.named_parameters():
        if not name.startswith(inside):
            state[name] = _plain(param, module_of=base, name=name).to(dtype)
    return state, dtype


def _plain(param: torch.Tensor, *, module_of: nn.Module, name: str) -> torch.Tensor:
    """A dense tensor for parameter `name` (a 4-bit linear outside any adapter is dequantized)."""
    if type(param).__name__ != "Params4bit":
        return param.detach()
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(module_of.get_submodule(name.rsplit(".", 1)[0])).detach()


def compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the base computes in: bitsandbytes' compute dtype when quantized, else its embeddings'. On the CPU
    always its embeddings' (fp32): where only the 4-bit layers' matmuls run in bf16 (``--cpu-bf16-base``), a copy in
    bf16 throughout would sample further from the policy that scoring computes."""
    embeddings = base.get_input_embeddings().weight
    if embeddings.device.type == "cpu":
        return embeddings.dtype
    qconfig = getattr(base.config, "quantization_config", None)
    compute = getattr(qconfig, "bnb_4bit_compute_dtype", None)
    if isinstance(qconfig, dict):
        compute = qconfig.get("bnb_4bit_compute_dtype")
    if isinstance(compute, str):
        compute = getattr(torch, compute.removeprefix("torch."))
    return compute or embeddings.dtype
