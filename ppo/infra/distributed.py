"""Data-parallel PPO over ``torch.distributed``: what changes when ``torchrun`` starts several processes.

Each rank owns its environments, a disjoint shard of the tasks, and its own rollouts. The pieces that must see
the whole batch go through collectives: gradients of the trainable parameters are summed (each rank's loss is
already weighted by the global action-token count, so the sum is the global token-mean), advantage whitening and
the KL controller use statistics over all ranks, and logged metrics are computed from every rank's episodes.
Only rank 0 writes logs and checkpoints. Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) every
function here is the identity, so a single process runs exactly as before.

Backends: NCCL when the process has a GPU, gloo on the CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """Join the process group when started by torchrun; returns (rank, world_size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device() -> str | None:
    """The GPU this rank should use under torchrun, or None to keep the default choice."""
    if active() and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of floats over all ranks."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj) -> list:
    """One picklable object from each rank, in rank order."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over all ranks, in one flat buffer (one collective per step)."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads]).to(_device())
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(device=g.device, dtype=g.dtype)
        offset += n


def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Make every rank start from rank 0's trainable parameters."""
    if not active():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def once_per_node(build, cached, poll_seconds: float = 2.0):
    """``build()`` on local rank 0; on the other ranks, wait until ``cached()`` returns a path.

    A rank 0 that fails ends the job (torchrun stops every worker when one exits with an error), so the wait
    needs no collective and no timeout, however long the build takes.
    """
    import os
    import time

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        return build()
    path, said = cached(), False
    while path is None:
        if not said:
            print(
                f"rank {os.environ.get('RANK', '?')}: waiting for local rank 0 to build the model", flush=True
            )
            said = True
        time.sleep(poll_seconds)
        path = cached()
    return path
