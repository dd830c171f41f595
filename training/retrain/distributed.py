"""Data parallelism for the retrain job with PyTorch's own engine: ``torchrun`` starts the processes
and sets ``RANK`` / ``WORLD_SIZE``; gradients are averaged with ``all_reduce`` (gloo on CPU, NCCL
on GPUs). One process (plain ``python -m``) runs the same code with nothing to reduce."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def reduce_grads(params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Average the gradients (and, for the progress bar, the loss) over the processes."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean / world


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
