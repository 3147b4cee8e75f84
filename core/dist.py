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


def init(device: str = "cpu") -> None:
    """Open the process group if torchrun started us and it is not open yet."""
    if world() > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend)


def barrier() -> None:
    if world() > 1 and dist.is_initialized():
        dist.barrier()


def mine(index: int) -> bool:
    """Round-robin share of work item `index` (a batch) for this rank."""
    return index % world() == rank()
