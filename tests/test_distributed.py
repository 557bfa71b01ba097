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
