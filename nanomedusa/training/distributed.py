"""Running under `torchrun`: process group, device per process, and how the model is wrapped.

    torchrun --nproc-per-node 8 train.py ...   # RANK / WORLD_SIZE / LOCAL_RANK come from torchrun

Without those variables (plain `python train.py`) everything here is a no-op on one process.
Warm-up trains only the heads, so each process keeps a full replica and DDP all-reduces the heads'
gradients. Joint training updates the whole backbone, so FSDP (`fully_shard`, one unit per
transformer block, one for the heads, the rest at the root) shards weights, gradients and AdamW state.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..loading import resolve_device


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group if there is one (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, resolve_device(device))
    local_rank = int(os.environ["LOCAL_RANK"])
    # Each process drives the GPU of its local rank, whatever --device says about the index.
    on_gpu = resolve_device(device).type == "cuda"
    dev = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", device_id=dev if on_gpu else None)
    return Dist(dist.get_rank(), world, dev)


def shutdown(wait_for_all: bool = False) -> None:
    """Leave the process group. After a successful run (`wait_for_all`) first wait until every rank is
    here: a rank that tears its gloo connections down while rank 0 still writes the checkpoint was
    seen to abort ("terminate called without an active exception"). After an error, no waiting: the
    other ranks may never arrive."""
    if dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


def wrap(module: nn.Module, d: Dist, shard: bool) -> nn.Module:
    """DDP (shard=False) or FSDP (shard=True) across the processes; the module itself on one process."""
    if d.world == 1:
        return module
    if not shard:
        # broadcast_buffers=False: the only buffers are RoPE tables each process computes itself.
        return DistributedDataParallel(module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                       broadcast_buffers=False)
    for block in module.model.layers:
        fully_shard(block)
    fully_shard(module.heads)
    fully_shard(module)  # embeddings, final norm and lm_head (tied or not) live at the root
    return module


@contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool):
    """Skip the cross-process gradient reduction on all but the last micro-batch of a step."""
    if isinstance(wrapped, DistributedDataParallel) and not enabled:
        with wrapped.no_sync():
            yield
        return
    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(enabled)
    yield
