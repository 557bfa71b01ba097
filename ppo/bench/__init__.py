"""Rollout, update and memory benchmark: ``python -m ppo.bench [--json PATH] [--quick] [--gpu-only]``.

Models (random weights, Qwen3-shaped, saved to a temporary folder and loaded through `models.load_actor_critic`
exactly as training loads them, NF4 base + LoRA): the ``tiny`` preset and a ~100M-parameter "mid" model on the
CPU; a Qwen3-1.7B-shaped model on the GPU when one is present. Measured, each side by side in one run:

- rollout throughput (generated tokens/s): the static engine (`ppo.rollout.engine.StaticEngine`, what training runs) on
  16 episodes at once, against plain Hugging Face ``generate`` one episode at a time (and batched ``generate``,
  and the loop engine `ppo.rollout.generation.generate_turn` with and without the merged copy);
- update throughput (tokens/s through ``ActorCritic.forward_train`` + backward + optimizer step), and the trainer's
  update with the 4-bit base layers computing in bf16 (``--cpu-bf16-base``, on a CPU with bf16 units) against fp32;
- memory: the trainer's layout (one NF4 base, policy and critic adapters, value head, optimizer state after a
  step) against the policy alone and against three independently loaded copies (policy, reference, critic),
  as the bytes of every tensor's storage (exact) and as the growth of the process's resident memory.

Imports nothing from ``env`` or ``mcp_mock`` (the GPU machine has neither gymnasium nor mcp).
Letters: B rows, T token positions.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from models.loading import cpu_has_bf16
from ppo.bench.measure import (
    MID_SHAPE,
    TOKENIZER_TEXT,
    GiB,
    Recorder,
    build_random_model,
    load,
    log,
    machine_info,
    make_optimizer,
    memory_layouts,
    parameter_count,
    peak_rss_bytes,
    random_contexts,
    rollout_throughput,
    tensor_bytes,
    trainer_update_throughput,
    update_throughput,
    warmstart_step_throughput,
)

__all__ = ["main", "tensor_bytes"]


TINY_EPISODES = {"episodes": 64, "prefix": 300, "suffix": (20, 280)}
# A warm-start batch of the tiny default: 16 demonstrations, the same shared prefix and suffix lengths.
WARMSTART_BATCH = {"rows": 16, "prefix": 300, "suffix": (20, 280), "steps": 5}


def cpu_model_section(
    rec: Recorder,
    path: Path,
    *,
    episodes: int,
    prompt: int,
    new_tokens: int,
    quick: bool,
    trainer_update: bool = False,
) -> dict[str, Any]:
    """Rollout and update throughput of one model on the CPU; ``trainer_update``: also the trainer's own update of
    a batch shaped like the default run's (``trainer_update_vs_per_episode`` puts it against the same yardstick as
    the rollout: per-episode generation, which nothing of ours changes)."""
    ac = load(path, device="cpu")
    contexts = random_contexts(episodes, prompt, ac.config.vocab_size)
    out: dict[str, Any] = {"parameters": parameter_count(ac.model.get_base_model())}
    roll = rec.attempt(out, "rollout", lambda: rollout_throughput(ac, contexts, new_tokens, per_episode=True))
    if "per_episode_hf_generate" in roll:
        baseline = roll["per_episode_hf_generate"]["tokens_per_s"]
        # The static engine is what training runs; the loop engine merges on a 4-bit CPU base.
        out["rollout_speedup_vs_per_episode"] = roll["static"]["tokens_per_s"] / baseline
        out["rollout_speedup_loop_vs_per_episode"] = roll["batched_merged"]["tokens_per_s"] / baseline
    batch, length = (4, 32) if quick else (8, 128)
    rec.attempt(out, "update", lambda: update_throughput(ac, make_optimizer(ac), batch, length, micro=4))
    if trainer_update:
        # The default run's shape on the tiny preset: 64 episodes, a 300-token shared prefix, 20-280 tokens after.
        shape = {"episodes": 8, "prefix": 24, "suffix": (4, 24)} if quick else TINY_EPISODES
        pad = ac.tokenizer.pad_token_id
        up = rec.attempt(out, "trainer_update", lambda: trainer_update_throughput(ac, pad, **shape))
        if "per_episode_hf_generate" in roll and "ppo_epochs_tokens_per_s" in up:
            out["trainer_update_vs_per_episode"] = up["ppo_epochs_tokens_per_s"] / baseline
        # The same update with the suffixes padded after the shared prefix instead of packed (models.prefix).
        ac.pack_suffixes = False
        padded = rec.attempt(
            out, "trainer_update_padded", lambda: trainer_update_throughput(ac, pad, **shape)
        )
        ac.pack_suffixes = True
        if "ppo_epochs_tokens_per_s" in up and "ppo_epochs_tokens_per_s" in padded:
            out["trainer_update_packed_vs_padded"] = (
                up["ppo_epochs_tokens_per_s"] / padded["ppo_epochs_tokens_per_s"]
            )
        if cpu_has_bf16():
            # The same update with the 4-bit base layers computing in bf16 (--cpu-bf16-base).
            bf16 = load(path, device="cpu", cpu_bf16_base=True)
            fast = rec.attempt(
                out, "trainer_update_bf16_base", lambda: trainer_update_throughput(bf16, pad, **shape)
            )
            del bf16
            if "ppo_epochs_tokens_per_s" in up and "ppo_epochs_tokens_per_s" in fast:
                out["trainer_update_bf16_vs_fp32_base"] = {
                    "ppo_epochs": fast["ppo_epochs_tokens_per_s"] / up["ppo_epochs_tokens_per_s"],
                    "scoring": up["scoring_s"] / fast["scoring_s"],
                }
        # The warm start's supervised steps, packed (as it runs) and padded: a batch of 16 demonstrations.
        sft = {"rows": 4, "prefix": 24, "suffix": (4, 24), "steps": 1} if quick else {**WARMSTART_BATCH}
        for name, pack in (("warmstart_step", True), ("warmstart_step_padded", False)):
            rec.attempt(out, name, lambda pack=pack: warmstart_step_throughput(path, **sft, pack=pack))
        if "s_per_step" in out.get("warmstart_step", {}) and "s_per_step" in out.get(
            "warmstart_step_padded", {}
        ):
            out["warmstart_step_packed_vs_padded"] = (
                out["warmstart_step_padded"]["s_per_step"] / out["warmstart_step"]["s_per_step"]
            )
    return out


def run_cpu(rec: Recorder, workdir: Path, quick: bool) -> None:
    """The tiny preset and the mid-size model on the CPU, the memory layouts of the mid-size model, and the bf16
    fidelity of the samplers."""
    from models.tiny import build_tiny
    from ppo.bench.gpu import bf16_fidelity
    from ppo.tiny.build import ensure_tiny

    # Short prompts: the figure is decode throughput (a prompt's prefill costs the same batched or not).
    episodes, prompt, new_tokens = (4, 16, 8) if quick else (16, 32, 64)
    log("cpu: tiny preset")
    small = {
        "texts": [TOKENIZER_TEXT] * 4,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
    }
    tiny = build_tiny(workdir / "tiny", **small) if quick else ensure_tiny()
    results = rec.results
    cpu = results.setdefault("cpu", {})
    sizes = {"episodes": episodes, "prompt": prompt, "new_tokens": new_tokens, "quick": quick}
    rec.attempt(cpu, "tiny", lambda: cpu_model_section(rec, tiny, **sizes, trainer_update=True))
    quick_shape = {"hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256, "vocab_size": 1024}
    shape = {**MID_SHAPE, **quick_shape} if quick else MID_SHAPE
    log(f"cpu: mid-size model {shape}")
    mid = build_random_model(workdir / "mid", shape)
    mid_out = rec.attempt(cpu, "mid", lambda: cpu_model_section(rec, mid, **sizes))
    memory = rec.attempt(cpu, "memory", lambda: memory_layouts(mid))
    log("cpu: bf16 log-prob error of the samplers and the scoring pass against fp32")
    rec.attempt(cpu, "bf16_logprob_error_vs_fp32", lambda: bf16_fidelity(quick))
    results["rollout_speedup_vs_per_episode"] = mid_out.get("rollout_speedup_vs_per_episode")
    if "trainer" in memory:
        results["memory_ratio_vs_policy_alone"] = memory["trainer"]["ratio_vs_policy_alone"]
        results["memory_ratio_three_copies"] = memory["three_copies"]["ratio_vs_policy_alone"]
    cpu["peak_rss_gb"] = peak_rss_bytes() / GiB
    rec.save()


# ----- report ---------------------------------------------------------------------------------------------


def summarize(results: dict[str, Any]) -> None:
    """Headline GPU figures (None where their measurement failed).

    ``ppo_iteration_peak_gb`` is the largest peak of the iteration's phases (rollout with the default engine,
    scoring, update); ``rollout_speedup_vs_loop`` compares the static engine with the Hugging Face loop on the
    same short turns.
    """
    gpu = results.get("gpu")
    if gpu is None:
        return
    it = gpu.get("ppo_iteration", {})

    def figure(phase: str, key: str) -> float | None:
        value = it.get(phase, {})
        return value.get(key) if isinstance(value, dict) else None

    peaks = [figure(p, "peak_gb") for p in ("rollout", "scoring", "update")]
    gpu["ppo_iteration_peak_gb"] = max(peaks) if None not in peaks else None
    gpu["rollout_tokens_per_s"] = figure("rollout", "tokens_per_s")
    engines = gpu.get("engines", {})
    rates = [engines.get(e, {}).get("tokens_per_s") for e in ("static", "loop")]
    gpu["rollout_speedup_vs_loop"] = rates[0] / rates[1] if None not in rates else None


def table(results: dict[str, Any]) -> str:
    """The figures as aligned ``name  value`` lines, nested keys joined by dots."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, float):
            rows.append((prefix, f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"))
        else:
            rows.append((prefix, str(value)))

    walk("", results)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table and write the JSON. Returns the results."""
    parser = argparse.ArgumentParser(prog="python -m ppo.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): for tests")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU measurements")
    args = parser.parse_args(argv)
    if args.gpu_only and not torch.cuda.is_available():
        parser.error("--gpu-only asked for, but this machine has no CUDA device: nothing to measure")
    rec = Recorder(args.json)
    results = rec.results
    results.update(machine=machine_info(), quick=args.quick)
    for key in (
        "rollout_speedup_vs_per_episode",
        "memory_ratio_vs_policy_alone",
        "memory_ratio_three_copies",
    ):
        results[key] = None
    workdir = Path(tempfile.mkdtemp(prefix="qwen-tool-bench-"))
    try:
        if not args.gpu_only:
            run_cpu(rec, workdir, args.quick)
        if torch.cuda.is_available():
            from ppo.bench.gpu import run_gpu

            run_gpu(rec, workdir, args.quick)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        summarize(results)
        rec.save()
        print(table(results), flush=True)
    return results
