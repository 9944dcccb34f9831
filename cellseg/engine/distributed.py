"""Data-parallel training over processes launched by ``torchrun`` (one per GPU, or CPU processes).

``cellseg train`` under ``torchrun --nproc-per-node N`` opens a process group (NCCL between GPUs,
gloo between CPU processes) and ``fit`` trains one model with DistributedDataParallel. What
"the same training as one process" means here, and how it is kept:

* ``train.batch_size`` is per process: N processes train with the global batch N × batch_size, the
  same optimizer steps as one process given ``--batch-size`` N × batch_size.
* Each rank loads only its shard of the store: the training stacks ``split.train[rank::N]`` and the
  validation stacks ``split.val[rank::N]``. Every epoch each rank takes ``len(train) // N`` of its
  stacks in its own seeded order, so all ranks take the same number of steps. The loading-code draw
  of a stack depends only on (seed, stack, epoch), never on its rank.
* BatchNorm statistics are synchronised over the global batch (torch's ``SyncBatchNorm`` on GPUs,
  ``CpuSyncBatchNorm`` between CPU processes), and the class-weighted loss is normalised by the
  global weight sum, so the gradient is that of the global batch.
* Validation sums confusion counts and loss sums over ranks: the same metrics as one process.
* Rank 0 alone writes the run folder, the checkpoint and MLflow; the other ranks only read (the
  store and the run folder must be at the same path on every node: a shared file system).
* Augmentation draws come from each rank's own generator (rank 0 keeps the single-process stream),
  and every rank's generator state is saved in the checkpoint.

So a run on N processes equals a one-process run with the global batch up to floating-point
summation order whenever each global batch holds the same stacks (e.g. one batch per epoch) and
augmentation is off; otherwise the global batches are drawn per shard (stratified by rank) rather
than from one permutation, which is the same training statistically but not step for step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cellseg.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (a world of one without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, logs and prints."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's strided share of ``items``."""
        return list(items[self.rank :: self.size])


def launched() -> World:
    """The world torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def world() -> World:
    """The world of the initialised process group, or a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join the process group torchrun set up (NCCL for CUDA, gloo for the CPU) and leave it after.

    Without torchrun, or when a group is already initialised, this only reports the world.
    """
    env = launched()
    if env.size == 1 or dist.is_initialized():
        yield world()
        return
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"torchrun: local rank {env.local_rank} but {torch.cuda.device_count()} GPU(s) here; "
                              "start at most one process per GPU (--nproc-per-node), or train with --device cpu")
        torch.cuda.set_device(env.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", env.local_rank))
    else:
        dist.init_process_group("gloo")
    try:
        yield world()
    finally:
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place (identity in a world of one)."""
    if world().size > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if world().size == 1:
        return [obj]
    gathered: list[Any] = [None] * world().size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` (picklable) on every rank, e.g. a name only one process may choose."""
    if world().size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The seed of rank ``rank``'s random stream from ``epoch`` on (rank 0 from the start keeps ``seed``)."""
    if rank == 0 and epoch == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module to train: DistributedDataParallel over the parameters that currently need gradients.

    DDP fixes its parameter set when built, so call again after freezing or unfreezing.
    """
    if world().size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


# --- BatchNorm over the global batch ----------------------------------------------------------


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over the global batch for CPU processes (torch's ``SyncBatchNorm``
    works on GPUs only, and DDP refuses it on the CPU).

    The per-channel sums over the local batch are summed over ranks by ``_AllReduceSum``, whose
    backward sums the gradients over ranks, as torch's GPU kernels do.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world().size > 1):
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [d for d in range(x.dim()) if d != 1]
        channels = x.shape[1]
        count = x.new_full((1,), x.numel() // channels, dtype=torch.float64)
        local = torch.cat([x.sum(dims, dtype=torch.float64), (x * x).sum(dims, dtype=torch.float64), count])
        total = _AllReduceSum.apply(local)
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * n / (n - 1).clamp_min(1)).to(self.running_var.dtype), factor)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype) + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


_LOCAL_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def sync_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """Swap plain BatchNorm layers for synchronised ones (torch's ``SyncBatchNorm`` on GPUs,
    ``CpuSyncBatchNorm`` on the CPU), in place, keeping the very same parameter and buffer tensors:
    optimizers and parameter groups stay valid and state-dict keys are unchanged. Subclasses with
    extra behaviour (e.g. timm's BatchNormAct2d) keep local statistics."""
    cls = CpuSyncBatchNorm if device.type == "cpu" else nn.SyncBatchNorm
    for name, child in module.named_children():
        if type(child) in _LOCAL_TYPES:
            setattr(module, name, _moved(child, cls, local_type=type(child)))
        else:
            sync_batch_norm(child, device)
    return module


def local_batch_norm(module: nn.Module) -> nn.Module:
    """Undo ``sync_batch_norm`` (the trained model is saved and logged with plain BatchNorm)."""
    for name, child in module.named_children():
        if isinstance(child, (nn.SyncBatchNorm, CpuSyncBatchNorm)):
            setattr(module, name, _moved(child, child.local_type))
        else:
            local_batch_norm(child)
    return module


def _moved(old: nn.modules.batchnorm._BatchNorm, cls: type, **attrs: Any) -> nn.Module:
    new = cls(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats)
    if old.affine:
        new.weight, new.bias = old.weight, old.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(old, name))
    for key, value in attrs.items():
        setattr(new, key, value)
    return new.train(old.training)
