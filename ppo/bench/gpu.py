"""The GPU part of the benchmark: a Qwen3-1.7B-shaped model with random weights, NF4 + LoRA, one PPO iteration
of 32 episodes x 1024 tokens measured phase by phase (rollout, scoring, update), each phase in its own try.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models.scoring import position_ids_from_mask, token_logprobs
from ppo.bench.measure import (
    BF16,
    QWEN3_1_7B_SHAPE,
    GiB,
    Recorder,
    build_random_model,
    count_tokens,
    engine_turn,
    load,
    log,
    make_optimizer,
    peak_rss_bytes,
    random_contexts,
    timed,
    train_step,
)
from ppo.rollout.engine import StaticEngine, dense_copy, fp32_scores_supported
from ppo.rollout.generation import compute_dtype, left_pad


def run_gpu(
    rec: Recorder, workdir: Path, quick: bool, *, device: str = "cuda", shape: dict[str, Any] | None = None
) -> None:
    """Qwen3-1.7B shape, random weights, NF4 on the GPU: one PPO iteration of 32 x 1024 tokens, phase by phase.

    The iteration's rollout runs the default engine (`ppo.rollout.engine.StaticEngine`, CUDA graphs); the engines are
    then compared side by side on shorter turns: the static engine with and without graphs against the Hugging
    Face loop (`ppo.rollout.generation.sample_turn`, the ``loop`` engine). `device` and `shape` exist so that the same
    code can be dry-run on the CPU with a small model.
    """
    gpu: dict[str, Any] = rec.results.setdefault("gpu", {})
    shape = shape or ({**QWEN3_1_7B_SHAPE, "num_hidden_layers": 2} if quick else QWEN3_1_7B_SHAPE)
    episodes, prompt, new_tokens, short, micro = (4, 32, 16, 8, 2) if quick else (32, 256, 768, 128, 2)
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
    _perturb_policy(ac)
    contexts = random_contexts(episodes, prompt, ac.config.vocab_size)
    _iteration(rec, gpu, ac, contexts, new_tokens, micro)  # its tensors and optimizer are freed on return
    engines: dict[str, Any] = gpu.setdefault("engines", {"episodes": episodes, "new_tokens": short})
    samples: dict[str, Any] = {}
    for name, kw in (
        ("static", {"engine": "static"}),
        ("static_unmerged", {"engine": "static", "merge_lora": False}),
        ("static_no_graphs", {"engine": "static", "cuda_graphs": False}),
        ("loop", {"engine": "loop"}),
    ):
        out = rec.attempt(engines, name, lambda kw=kw: engine_rollout(ac, contexts, short, **kw))
        if "sample" in out:
            samples[name] = out.pop("sample")
            engines[f"{name}_sampler_vs_policy_logprob_gap"] = sampler_gap(ac, contexts, samples[name], micro)
    rec.attempt(gpu, "graphs_equal_eager", lambda: graphs_equal_eager(ac, contexts[:8], short // 2))
    rec.attempt(gpu, "logprob_error_vs_fp32", lambda: fp32_errors(ac, contexts[:8], samples))


def _iteration(
    rec: Recorder, gpu: dict[str, Any], ac, contexts: list[list[int]], new_tokens: int, micro: int
):
    """One PPO iteration phase by phase: rollout (default engine), scoring, update; each with its peak."""
    it: dict[str, Any] = gpu.setdefault(
        "ppo_iteration", {"episodes": len(contexts), "new_tokens": new_tokens}
    )
    turns = rec.attempt(it, "rollout", lambda: engine_rollout(ac, contexts, new_tokens, engine="static"))
    if "error" in turns:
        return
    sample = turns.pop("sample")
    ids, attn = _episodes_tensor(contexts, sample.tokens, ac.tokenizer.pad_token_id, _device(ac))
    it["tokens"] = int(attn.sum())
    rec.attempt(gpu, "sampler_vs_policy_logprob_gap", lambda: sampler_gap(ac, contexts, sample, micro))
    rec.attempt(it, "scoring", lambda: _peak_of(lambda: _score(ac, ids, attn, micro)))
    optimizer = make_optimizer(ac)
    rec.attempt(it, "update", lambda: _peak_of(lambda: train_step(ac, optimizer, ids, micro)))


def bf16_fidelity(quick: bool) -> dict[str, Any]:
    """bf16 on the CPU: each engine's sampled log-probs, and the scoring pass's, against the policy computed in fp32
    (`fp32_errors`), on a small random Qwen3 with a nonzero adapter. The GPU's figure is `logprob_error_vs_fp32`."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from models.actor_critic import ActorCritic

    layers, rows, prompt, new_tokens = (2, 4, 16, 8) if quick else (4, 8, 64, 32)
    config = Qwen3Config(
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=512,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    base = Qwen3ForCausalLM(config).to(BF16).eval()
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), adapter_name="policy"
    )
    ac = ActorCritic(model, tokenizer=SimpleNamespace(pad_token_id=0), critic="shared", settings={})
    _perturb_policy(ac)
    contexts = random_contexts(rows, prompt, config.vocab_size)
    samples = {}
    for engine in ("static", "loop"):
        torch.manual_seed(1)
        samples[engine] = engine_rollout(ac, contexts, new_tokens, engine=engine)["sample"]
    return {"rows": rows, "new_tokens": new_tokens, **fp32_errors(ac, contexts, samples)}


def _perturb_policy(ac) -> None:
    """Make the policy adapter nonzero (B starts at 0), as after training: the merged copy must carry it."""
    with torch.no_grad():
        for name, p in ac.model.named_parameters():
            if ".lora_B." in name and ".policy." in name:
                p.normal_(0.0, 0.005, generator=torch.Generator(p.device).manual_seed(0))


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


def engine_rollout(
    ac,
    contexts: list[list[int]],
    new_tokens: int,
    *,
    engine: str,
    cuda_graphs: bool = True,
    merge_lora: bool = True,
) -> dict[str, Any]:
    """`engine_turn` of full length for every context (the end-of-turn id is outside the vocabulary, so never
    sampled), in eval mode under the policy role, timed with its peak memory. Returns tokens/s, seconds, peak GiB
    and the `TurnSample` under "sample"."""
    box: dict[str, Any] = {}

    def run() -> None:
        ac.model.eval()
        with ac.policy():
            box["sample"] = engine_turn(
                ac.model,
                contexts,
                new_tokens,
                eot=ac.config.vocab_size,
                pad=ac.tokenizer.pad_token_id,
                engine=engine,
                cuda_graphs=cuda_graphs,
                merge_lora=merge_lora,
                max_context=4096,
            )

    out = _peak_of(run)
    out["tokens_per_s"] = count_tokens(box["sample"].tokens) / out["seconds"]
    if engine == "static":
        out["fp32_attention_scores"] = fp32_scores_supported(_device(ac), compute_dtype(ac.model))
    rate, peak = out["tokens_per_s"], out["peak_gb"]
    log(
        f"  rollout {engine} graphs={cuda_graphs} merged={merge_lora}: {rate:,.0f} tokens/s, peak {peak:.2f} GiB"
    )
    return {**out, "sample": box["sample"]}


def _turn_logprobs(logprobs: torch.Tensor, turns: list[list[int]]) -> list[torch.Tensor]:
    """Each turn's log-probs out of (B, T) log-probs of left-padded context + turn rows (its last positions)."""
    width = logprobs.shape[1]
    return [logprobs[r, width - len(turn) :].float().cpu() for r, turn in enumerate(turns)]


def _spread(gaps: list[torch.Tensor]) -> dict[str, float]:
    every = torch.cat(gaps)
    return {"mean": float(every.mean()), "max": float(every.max()), "tokens": every.numel()}


@torch.no_grad()
def sampler_gap(ac, contexts: list[list[int]], sample, micro: int) -> dict[str, float]:
    """|sampler log-prob - policy log-prob| over the sampled tokens, the policy's from `ActorCritic.score`
    (NF4 + LoRA, the numbers PPO uses). In bf16 two kernels never agree exactly: this is the size of it."""
    rows = [c + t for c, t in zip(contexts, sample.tokens, strict=True)]
    ids, mask = left_pad(rows, ac.tokenizer.pad_token_id)
    gaps = []
    with ac.policy():
        for start in range(0, len(rows), micro):
            sl = slice(start, start + micro)
            scored = ac.score(ids[sl].to(_device(ac)), mask[sl].to(_device(ac)), temperature=1.0)["logprobs"]
            for policy, turn in zip(
                _turn_logprobs(scored, sample.tokens[sl]), sample.logprobs[sl], strict=True
            ):
                gaps.append((policy - torch.tensor(turn)).abs())
    return _spread(gaps)


@torch.no_grad()
def fp32_errors(ac, contexts: list[list[int]], samples: dict[str, Any]) -> dict[str, dict[str, float]]:
    """|log-prob - exact log-prob| over the first rows' sampled tokens, for each engine's sampler and for the
    scoring pass PPO trains on; exact is the policy computed in fp32 (its dequantized base, the adapter beside
    it). `sampler_gap` says that two bf16 computations differ; this says which of them is off, and by how much."""
    pad, device = ac.tokenizer.pad_token_id, _device(ac)
    with ac.policy():
        exact_model = dense_copy(ac.model, merge_lora=False)
    if exact_model is ac.model:  # nothing to dequantize: copy before widening, never widen the policy itself
        exact_model = copy.deepcopy(exact_model)
    exact_model = exact_model.float()  # the copy's own Parameters (merged_copy never hands out the policy's)
    out: dict[str, dict[str, float]] = {}
    try:
        for name, sample in samples.items():
            turns = sample.tokens[: len(contexts)]
            ids, mask = left_pad([c + t for c, t in zip(contexts, turns, strict=True)], pad)
            ids, mask = ids.to(device), mask.to(device)
            hidden = exact_model.get_decoder()(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
            ).last_hidden_state
            exact = token_logprobs(hidden, ids, mask, exact_model.get_output_embeddings())["logprobs"]
            exact = _turn_logprobs(exact, turns)
            with ac.policy():
                scored = _turn_logprobs(ac.score(ids, mask, temperature=1.0)["logprobs"], turns)
            sampled = [torch.tensor(lp) for lp in sample.logprobs[: len(contexts)]]
            for key, got in ((name, sampled), (f"{name}_scoring_pass", scored)):
                out[key] = _spread([(g - e).abs() for g, e in zip(got, exact, strict=True)])
            log(
                f"  vs fp32: {name} sampler {out[name]['mean']:.4f}, scoring {out[name + '_scoring_pass']['mean']:.4f}"
            )
    finally:
        del exact_model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


@torch.no_grad()
def graphs_equal_eager(ac, contexts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Greedy turns of the static engine with CUDA graphs and without, on the same bucketed shapes: the same
    kernels, so the same tokens (exact shapes would change reduction lengths, and bf16 ties flip greedy picks)."""
    pad = ac.tokenizer.pad_token_id
    samples = []
    with ac.policy():
        for graphs in (True, False):
            engine = StaticEngine(
                ac.model, rows=len(contexts), max_context=4096, pad_id=pad, cuda_graphs=graphs, buckets=True
            )
            samples.append(
                engine.sample(
                    list(range(len(contexts))),
                    contexts,
                    max_new_tokens=new_tokens,
                    temperature=0,
                    end_of_turn_id=-1,
                )
            )
            engine.close()
    same = sum(a == b for a, b in zip(samples[0].tokens, samples[1].tokens, strict=True))
    gap = max(
        abs(x - y)
        for a, b in zip(samples[0].logprobs, samples[1].logprobs, strict=True)
        for x, y in zip(a, b, strict=True)
    )
    return {"rows": len(contexts), "rows_identical": same, "max_logprob_gap": gap}


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


def _device(ac) -> torch.device:
    return next(ac.model.parameters()).device
