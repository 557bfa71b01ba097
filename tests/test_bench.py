"""`python -m ppo.bench --quick` end to end in a subprocess: the JSON has every figure, finite and positive.

Speeds are never asserted (they depend on the machine); the memory ratios are, loosely, because they count
tensor bytes, which do not depend on the machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppo.bench import tensor_bytes


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # One thread: on a shared two-core machine two threads contending with other work spin on each other.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["QWEN_TOOL_CACHE"] = str(out.parent / "cache")
    done = subprocess.run(
        [sys.executable, "-m", "ppo.bench", "--quick", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rollout_speedup_vs_per_episode" in done.stdout  # the table is printed
    return json.loads(out.read_text(encoding="utf-8"))


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_headline_ratios_are_finite_and_positive(quick_results):
    for key in (
        "rollout_speedup_vs_per_episode",
        "memory_ratio_vs_policy_alone",
        "memory_ratio_three_copies",
    ):
        assert _positive(quick_results[key]), (key, quick_results[key])
    # Adapters, value head and optimizer state add to the policy; three copies hold three 4-bit bases.
    assert 1.0 < quick_results["memory_ratio_vs_policy_alone"] < quick_results["memory_ratio_three_copies"]
    assert quick_results["memory_ratio_three_copies"] > 2.5


def test_every_cpu_measurement_ran(quick_results):
    machine = quick_results["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] == torch.__version__
    for model in ("tiny", "mid"):
        section = quick_results["cpu"][model]
        assert "error" not in section["rollout"] and "error" not in section["update"], section
        for engine in (
            "static",
            "batched",
            "batched_merged",
            "batched_hf_generate",
            "per_episode_hf_generate",
        ):
            assert _positive(section["rollout"][engine]["tokens_per_s"]), engine
            assert section["rollout"][engine]["tokens"] > 0
        assert _positive(section["update"]["tokens_per_s"])
    trainer = quick_results["cpu"]["tiny"]["trainer_update"]  # the trainer's own update, tiny model only
    assert "error" not in trainer and trainer["episodes"] == 8, trainer
    assert _positive(trainer["ppo_epochs_tokens_per_s"]) and _positive(trainer["scoring_s"])
    assert _positive(quick_results["cpu"]["tiny"]["trainer_update_vs_per_episode"])
    padded = quick_results["cpu"]["tiny"]["trainer_update_padded"]  # the same batch, suffixes padded
    assert padded["tokens"] == trainer["tokens"] and _positive(padded["ppo_epochs_tokens_per_s"])
    assert _positive(quick_results["cpu"]["tiny"]["trainer_update_packed_vs_padded"])
    for name in ("warmstart_step", "warmstart_step_padded"):  # the warm start's supervised steps, both ways
        step = quick_results["cpu"]["tiny"][name]
        assert (
            "error" not in step and _positive(step["s_per_step"]) and _positive(step["labelled_tokens_per_s"])
        )
    assert _positive(quick_results["cpu"]["tiny"]["warmstart_step_packed_vs_padded"])
    memory = quick_results["cpu"]["memory"]
    for layout in ("policy_alone", "trainer", "three_copies"):
        assert memory[layout]["tensor_bytes"] > 0
    fidelity = quick_results["cpu"]["bf16_logprob_error_vs_fp32"]
    for key in ("static", "static_scoring_pass", "loop", "loop_scoring_pass"):
        # bf16 rounding is there (> 0) and small (a wrong distribution would be off by whole nats)
        assert 0 < fidelity[key]["mean"] <= fidelity[key]["max"] < 0.1, (key, fidelity[key])
    assert "gpu" not in quick_results  # the GPU was hidden from the subprocess


def test_tensor_bytes_counts_shared_storage_once():
    layer = torch.nn.Linear(4, 3)  # 12 weights + 3 biases, fp32
    assert tensor_bytes([layer]) == 15 * 4
    tied = torch.nn.Sequential(layer, torch.nn.Linear(4, 3))
    tied[1].weight = layer.weight
    assert tensor_bytes([tied]) == (12 + 3 + 3) * 4
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.ones(1, 4)).sum().backward()
    optimizer.step()  # two moments per parameter, plus a scalar step count per parameter
    assert tensor_bytes([layer], [optimizer]) == 15 * 4 * 3 + 2 * 4


def test_gpu_section_runs_end_to_end_on_the_cpu(tmp_path):
    """The GPU code path, dry-run on the CPU with a small shape: every phase reports, none fails."""
    from ppo.bench import summarize
    from ppo.bench.gpu import run_gpu
    from ppo.bench.measure import Recorder

    rec = Recorder(tmp_path / "gpu.json")
    shape = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    shape.update(head_dim=32, intermediate_size=128, vocab_size=512)
    run_gpu(rec, tmp_path, quick=True, device="cpu", shape=shape)
    summarize(rec.results)
    gpu = rec.results["gpu"]
    iteration = gpu["ppo_iteration"]
    for phase in ("rollout", "scoring", "update"):
        assert "error" not in iteration[phase] and _positive(iteration[phase]["peak_gb"]), phase
    assert "sample" not in iteration["rollout"]  # the sampled ids stay out of the JSON
    assert iteration["tokens"] == 4 * 16 + sum(len(c) for c in _contexts(shape))
    for engine in ("static", "static_unmerged", "static_no_graphs", "loop"):
        assert _positive(gpu["engines"][engine]["tokens_per_s"]), engine
        # fp32 on the CPU: the sampler's log-probs are the policy's to rounding (bf16 on a GPU: ~0.1).
        assert 0 <= gpu["engines"][f"{engine}_sampler_vs_policy_logprob_gap"]["max"] < 1e-3
    assert 0 <= gpu["sampler_vs_policy_logprob_gap"]["max"] < 1e-3
    assert gpu["graphs_equal_eager"]["rows_identical"] == 4  # no graphs on the CPU: the same path twice
    assert _positive(gpu["ppo_iteration_peak_gb"]) and _positive(gpu["rollout_tokens_per_s"])
    assert _positive(gpu["rollout_speedup_vs_loop"])
    assert json.loads((tmp_path / "gpu.json").read_text())["gpu"]["ppo_iteration"]["tokens"] > 0


def _contexts(shape: dict) -> list[list[int]]:
    from ppo.bench.measure import random_contexts

    return random_contexts(4, 32, shape["vocab_size"])
