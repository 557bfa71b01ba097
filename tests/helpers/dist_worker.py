"""A torchrun worker for tests/test_distributed.py: trains, then saves this rank's trainable parameters."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main() -> None:
    from ppo import train
    from ppo.infra.config import parse_args
    from ppo.trainer import loop

    cfg = parse_args(sys.argv[1:])
    captured = {}
    load_policy = loop.load_policy

    def keep(*args, **kwargs):
        captured["ac"] = load_policy(*args, **kwargs)
        return captured["ac"]

    loop.load_policy = keep
    rank = int(__import__("os").environ["RANK"])
    train.main(cfg)
    ac = captured["ac"]
    params = {
        f"p{i}": p.detach().cpu() for i, p in enumerate(ac.policy_parameters() + ac.critic_parameters())
    }
    torch.save(params, Path(cfg.output_dir) / f"trainable_rank{rank}.pt")


if __name__ == "__main__":
    main()
