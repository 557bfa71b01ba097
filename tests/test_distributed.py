"""Data-parallel PPO: two gloo processes on the CPU, started by torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.test_train import SMALL_RUN

REPO = Path(__file__).resolve().parents[1]


def test_two_ranks_stay_identical_and_count_every_episode(small_tiny_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
        str(REPO / "tests" / "helpers" / "dist_worker.py"),
        "--model", str(small_tiny_dir), "--iterations", "2", "--output-dir", str(out), "--save-every", "1",
        *SMALL_RUN,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0 = torch.load(out / "trainable_rank0.pt")
    rank1 = torch.load(out / "trainable_rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [0, 1]  # one writer: rank 0
    assert all(x["charts/episodes"] == 8 for x in lines)  # 4 episodes on each of the 2 ranks
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("iter_*"))
    assert checkpoints == ["iter_000001", "iter_000002"]
    state = torch.load(out / "checkpoints" / "iter_000002" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["samplers"]) == 2
    assert proc.stdout.count("iter    2/2") == 1  # one summary line per iteration, from rank 0


def test_a_cold_cache_is_built_once_per_node_and_shared(tmp_path):
    # The tiny preset on an empty cache: local rank 0 builds the model and its warm start (cut to one step),
    # rank 1 waits for it instead of building the same folder at the same time, and both then train.
    out = tmp_path / "run"
    small_ppo = [a for a in SMALL_RUN if a != "--no-warmstart"]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
        "-m", "ppo.train", "--preset", "tiny", "--iterations", "1", "--output-dir", str(out),
        "--sft-tasks", "16", "--sft-epochs", "1", *small_ppo,
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "QWEN_TOOL_CACHE": str(tmp_path / "cache"),
    }
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    said = proc.stdout + proc.stderr
    assert said.count("warm start: building") == 1, said[-4000:]
    assert "waiting for local rank 0 to build the model" in said
    warm = [p for p in (tmp_path / "cache").iterdir() if "-warm-" in p.name and not p.name.startswith(".")]
    assert len(warm) == 1 and (warm[0] / "config.json").is_file()
    assert (out / "checkpoints" / "iter_000001" / "trainer_state.pt").is_file()
