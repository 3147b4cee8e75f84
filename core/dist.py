"""Several processes under torchrun: who am I, how many are we, wait for the others.

One process (no torchrun) is world 1, rank 0, and every call here is a no-op. Under torchrun the
process group is opened once (gloo on CPU, NCCL on GPUs), from the environment torchrun sets.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device: str = "cpu") -> str:
    """Open the process group if torchrun started us and it is not open yet; returns this rank's
    device (`cuda` becomes `cuda:<LOCAL_RANK>` under torchrun)."""
    if world() > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend)
    return f"cuda:{local_rank()}" if device == "cuda" and world() > 1 else device


def barrier() -> None:
    if world() > 1 and dist.is_initialized():
        dist.barrier()


def mine(index: int) -> bool:
    """Round-robin share of work item `index` (a batch) for this rank."""
    return index % world() == rank()


def gather_all(items: list) -> list:
    """Every rank's `items` (picklable), concatenated in rank order; one process: `items`."""
    if world() == 1 or not dist.is_initialized():
        return list(items)
    out: list = [None] * world()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def sum_grads(params: list[torch.Tensor]) -> None:
    """Sum the gradients of `params` over ranks (each rank scaled its loss by 1 / its share), in one
    flat buffer; a parameter without a gradient on this rank counts as zero."""
    if world() == 1 or not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset: offset + n].view_as(g).to(g.dtype)
        offset += n
