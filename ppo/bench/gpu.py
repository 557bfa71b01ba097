"""The GPU part of the benchmark: a Qwen3-1.7B-shaped model with random weights, NF4 + LoRA, one PPO iteration
of 32 episodes x 1024 tokens measured phase by phase (rollout, scoring, update), each phase in its own try.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models.scoring import position_ids_from_mask
from ppo.bench.measure import (
    BF16,
    QWEN3_1_7B_SHAPE,
    GiB,
    Recorder,
    build_random_model,
    count_tokens,
    load,
    log,
    make_optimizer,
    peak_rss_bytes,
    random_contexts,
    rollout_throughput,
    timed,
    train_step,
)
from ppo.generation import generate_turn, left_pad, merged_copy


def run_gpu(
    rec: Recorder, workdir: Path, quick: bool, *, device: str = "cuda", shape: dict[str, Any] | None = None
) -> None:
    """Qwen3-1.7B shape, random weights, NF4 on the GPU: one PPO iteration of 32 x 1024 tokens, phase by phase.

    `device` and `shape` exist so that the same code can be dry-run on the CPU with a small model.
    """
    gpu: dict[str, Any] = rec.results.setdefault("gpu", {})
    shape = shape or ({**QWEN3_1_7B_SHAPE, "num_hidden_layers": 2} if quick else QWEN3_1_7B_SHAPE)
    episodes, prompt, new_tokens, micro = (4, 32, 16, 2) if quick else (32, 256, 768, 4)
    log(f"gpu: building a random {shape['num_hidden_layers']}-layer Qwen3-1.7B-shaped model")
    folder = workdir / "qwen3-1.7b"
    built = rec.attempt(
        gpu, "build", lambda: str(build_random_model(folder, shape, device=device, dtype=BF16))
    )
    if isinstance(built, dict):
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the bf16 build is gone; peaks start at the NF4 load
    log("gpu: loading it in NF4 with LoRA adapters")
    ac = rec.attempt(gpu, "load", lambda: _peak_of(lambda: load(folder, device=device), keep=True))
    if "error" in ac:
        return
    ac = ac.pop("result")
    contexts = random_contexts(episodes, prompt, ac.config.vocab_size)
    it: dict[str, Any] = gpu.setdefault("ppo_iteration", {"episodes": episodes, "new_tokens": new_tokens})
    turns = rec.attempt(it, "rollout_merged", lambda: gpu_rollout(ac, contexts, new_tokens, merge=True))
    if "error" in turns:
        return
    ids, attn = _episodes_tensor(contexts, turns.pop("turns"), ac.tokenizer.pad_token_id, _device(ac))
    it["tokens"] = int(attn.sum())
    rec.attempt(it, "scoring", lambda: _peak_of(lambda: _score(ac, ids, attn, micro)))
    optimizer = make_optimizer(ac)
    rec.attempt(it, "update", lambda: _peak_of(lambda: train_step(ac, optimizer, ids, micro)))
    rec.attempt(gpu, "merged_vs_unmerged_logprob_gap", lambda: merged_gap(ac, contexts[:4]))
    rec.attempt(it, "rollout_nf4_lora", lambda: gpu_rollout(ac, contexts, new_tokens, merge=False))
    it["rollout_nf4_lora"].pop("turns", None)
    rec.attempt(gpu, "rollout_engines", lambda: rollout_throughput(ac, contexts[:16], 128, per_episode=False))


def _peak_of(fn: Callable[[], Any], keep: bool = False) -> dict[str, Any]:
    """Seconds, peak and final GiB of GPU memory allocated while fn() runs (CPU: the process's peak RSS).

    With `keep`, fn()'s result is returned under "result"."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result, seconds = timed(fn)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    out = {"seconds": seconds, "peak_gb": peak / GiB}
    if cuda:
        out["allocated_after_gb"] = torch.cuda.memory_allocated() / GiB
    return {**out, "result": result} if keep else out


def gpu_rollout(ac, contexts: list[list[int]], new_tokens: int, *, merge: bool) -> dict[str, Any]:
    """Full-length turns (the end-of-turn id is outside the vocabulary, so never sampled): tokens/s, peak GiB."""
    never, pad = ac.config.vocab_size, ac.tokenizer.pad_token_id
    box: dict[str, Any] = {}

    def run() -> None:
        with ac.policy():
            box["turns"] = generate_turn(
                ac.model,
                contexts,
                max_new_tokens=new_tokens,
                temperature=1.0,
                end_of_turn_id=never,
                pad_id=pad,
                merge_lora=merge,
            )

    out = _peak_of(run)
    out["tokens_per_s"] = count_tokens(box["turns"]) / out["seconds"]
    log(f"  rollout merge_lora={merge}: {out['tokens_per_s']:,.0f} tokens/s, peak {out['peak_gb']:.2f} GiB")
    return {**out, "turns": box["turns"]}


def _episodes_tensor(contexts, turns, pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and mask of prompt + turn, as the rollout hands them to the update."""
    rows = [c + t for c, t in zip(contexts, turns, strict=True)]
    ids, mask = left_pad([r[::-1] for r in rows], pad)  # left-pad the reversed rows = right-pad the rows
    return ids.flip(1).to(device), mask.flip(1).to(device)


@torch.no_grad()
def _score(ac, ids: torch.Tensor, attn: torch.Tensor, micro: int) -> None:
    """The scoring pass of an iteration: policy and reference log-probs and values, micro-batch by micro-batch."""
    for rows in range(0, ids.shape[0], micro):
        sl = slice(rows, rows + micro)
        ac.score(ids[sl], attn[sl], role="policy")
        ac.score(ids[sl], attn[sl], role="reference")
        ac.values(ids[sl], attn[sl])


@torch.no_grad()
def merged_gap(ac, contexts: list[list[int]]) -> float:
    """Largest |log-prob| gap between the merged (bf16 on the GPU) copy and the NF4 + LoRA policy, same tokens."""
    ids, mask = left_pad(contexts, ac.tokenizer.pad_token_id)
    ids, mask = ids.to(_device(ac)), mask.to(_device(ac))
    with ac.policy():
        policy = ac.score(ids, mask)["logprobs"]
        copy = merged_copy(ac.model)
        logits = copy(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits.float()
    merged = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    keep = mask[:, 1:].bool() & mask[:, :-1].bool()
    return float((merged - policy[:, 1:]).abs()[keep].max())


def _device(ac) -> torch.device:
    return next(ac.model.parameters()).device
