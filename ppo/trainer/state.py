"""The state a run carries from one iteration to the next, and the one ``state_dict`` that saves and resumes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ppo.infra import distributed as dist


class TaskSampler:
    """Task ids in shuffled passes over the task list; its state is part of a checkpoint."""

    def __init__(self, task_ids: list[str], seed: int):
        if not task_ids:
            raise ValueError("the task list is empty")
        self.task_ids = list(task_ids)
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []
        self.position = 0

    def sample(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            if self.position >= len(self.order):
                self.order = self.rng.permutation(len(self.task_ids)).tolist()
                self.position = 0
            out.append(self.task_ids[self.order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order, self.position = list(state["order"]), int(state["position"])


@dataclass
class RunState:
    """Policy (with critic), optimizer, schedule, KL controller and task sampler of one run (one rank's share).

    ``state_dict`` holds everything but the adapters and value head, which ``ActorCritic.save_pretrained`` writes
    beside it (``ppo.infra.checkpoint``); ``load_state_dict`` puts a checkpoint back exactly."""

    actor_critic: Any
    optimizer: Any
    scheduler: Any
    kl_ctl: Any
    sampler: TaskSampler

    def state_dict(self, iteration: int, config: dict) -> dict:
        """The trainer state after ``iteration`` iterations (every rank's task order gathered; call on all ranks)."""
        return {
            "iteration": iteration,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "samplers": dist.all_gather_objects(self.sampler.state_dict()),
            "world_size": dist.world_size(),
            "config": config,
        }

    def load_state_dict(self, state: dict) -> int:
        """Restore optimizer, schedule, KL controller and this rank's task order; returns the iterations done."""
        if state["world_size"] != dist.world_size():
            from ppo.infra.checkpoint import CheckpointError

            raise CheckpointError(
                f"this checkpoint was written by {state['world_size']} rank(s); resume it with as many "
                f"(now {dist.world_size()}), so each rank continues its own task order"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.sampler.load_state_dict(state["samplers"][dist.rank()])
        return int(state["iteration"])
