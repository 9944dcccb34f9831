"""Whole training batches, built on the training device.

Reading and normalising the pages a sample needs costs milliseconds per sample, so per-sample
loading, not the model, would set the pace on a GPU (resident batches: 721 samples/s against 357 for the
per-sample stream on one CPU core, docs/benchmarks.md). A store the size
of the paper's fits in memory: the resident source loads the needed channels of the selected
stacks once (at the model's pixel scale, kept as uint16, with each channel's intensity range) into
RAM or onto the training device, and each batch is the samples' random crops and the loading codes
as tensor ops: gather the planes the draws use, normalise, weight and sum (``CodePlan.combine``).
A store that does not fit is streamed from Zarr by a DataLoader over the per-sample dataset.
Both paths use dataset.py's view, crops and per-sample draws, so they yield identical batches.
A rank of a distributed run builds its source over its shard of the stacks only (``per_epoch``
and ``stream`` keep the ranks in step and their orders independent; engine/distributed.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from cellseg.data.codes import CodePlan
from cellseg.data.dataset import (
    StackDataset,
    check_plan,
    crop_generator,
    cut,
    epoch_order,
    load_view,
    sample_generator,
)
from cellseg.data.geometry import Geometry
from cellseg.data.intensity import Normalisation
from cellseg.data.store import Store, open_store
from cellseg.errors import ConfigError

Residency = Literal["auto", "ram", "device", "stream"]
GPU_SHARE = 0.25  # resident on the GPU only if the data takes at most this share of its free memory
RAM_SHARE = 0.5  # resident in RAM only if the data takes at most this share of available memory


def resident_bytes(store: Store, indices: Sequence[int], n_channels: int, geometry: Geometry) -> int:
    """Memory a resident source needs: uint16 channels plus a uint8 mask per stack, at the model's scale."""
    manifest = store.manifest
    pixels = 0
    for i in indices:
        h, w = geometry.shape(int(manifest["height"].iloc[i]), int(manifest["width"].iloc[i]))
        pixels += max(h, geometry.size) * max(w, geometry.size)
    return pixels * (2 * n_channels + 1)


def available_ram() -> int:
    """Bytes of memory available to a new allocation (MemAvailable on Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_residency(needed: int, device: torch.device) -> str:
    """'device' if it fits comfortably on the GPU, else 'ram' if it fits in memory, else 'stream'."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if needed <= GPU_SHARE * free:
            return "device"
    return "ram" if needed <= RAM_SHARE * available_ram() else "stream"


def _to(tensor: torch.Tensor, storage: torch.device, pin: bool) -> torch.Tensor:
    """Onto the storage device; pinned when it stays in RAM for a GPU (faster, async copies)."""
    return tensor.pin_memory() if pin else tensor.to(storage)


class _Batches:
    """What both sources share: the epoch order and the batching of it."""

    def __init__(self, indices: Sequence[int], plan: CodePlan, batch_size: int, device: torch.device,
                 seed: int, shuffle: bool, drop_last: bool, per_epoch: int | None = None, stream: int = 0):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.indices = [int(i) for i in indices]
        self.plan, self.batch_size, self.device = plan, batch_size, device
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.per_epoch = len(self.indices) if per_epoch is None else min(per_epoch, len(self.indices))
        self.stream = stream

    def __len__(self) -> int:
        n, b = self.per_epoch, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _order(self, epoch: int) -> torch.Tensor:
        return epoch_order(len(self.indices), self.seed, epoch, self.shuffle, self.stream)[: self.per_epoch]


class ResidentBatches(_Batches):
    """Needed channels of all selected stacks, at the model's pixel scale, held as uint16 on
    ``storage`` (CPU RAM or the GPU); each batch is cut from them. When every view is exactly one
    crop (whole stacks resized, or stacks of the crop size) they are one tensor and a batch gathers only
    the planes its draws use straight from it; otherwise each sample's crop is cut first."""

    def __init__(self, store: Store, indices, plan, geometry: Geometry, normalisation: Normalisation, batch_size,
                 device, storage: torch.device, seed, shuffle, drop_last, per_epoch=None, stream=0):
        super().__init__(indices, plan, batch_size, device, seed, shuffle, drop_last, per_epoch, stream)
        self.size, self.clip = geometry.size, normalisation.clips
        views = [load_view(store, index, plan.needed_channels, geometry, normalisation) for index in self.indices]
        self.ranges = torch.from_numpy(np.stack([v[2] for v in views])) if views else None
        self.whole = all(v[1].shape == (self.size, self.size) for v in views)
        pin = storage.type == "cpu" and device.type == "cuda"
        images, masks = [torch.from_numpy(v[0]) for v in views], [torch.from_numpy(v[1].astype(np.uint8)) for v in views]
        if self.whole and views:
            images, masks = torch.stack(images), torch.stack(masks)
            self.images, self.masks = _to(images, storage, pin), _to(masks, storage, pin)
        else:
            self.images, self.masks = [_to(t, storage, pin) for t in images], [_to(t, storage, pin) for t in masks]
        self.residency = "device" if storage.type != "cpu" else "ram"

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order(epoch)
        for start in range(0, len(order), self.batch_size):
            positions = order[start:start + self.batch_size]
            if self.drop_last and len(positions) < self.batch_size:
                return
            indices = [self.indices[p] for p in positions.tolist()]
            u = [self.plan.uniforms(1, sample_generator(self.seed, i, epoch)) for i in indices]
            index, weight = self.plan.choices(np.concatenate(u))
            ranges = self.ranges[positions]
            if self.whole:
                at = positions.to(self.images.device)
                if self.images.device == self.device:  # gather the planes the draws use straight from storage
                    x = self.plan.combine(self.images, index, weight, ranges, self.clip, rows=at)
                else:  # pinned RAM -> GPU: copy the batch's channels, build on the GPU
                    raw = self.images.index_select(0, at).to(self.device, non_blocking=True)
                    x = self.plan.combine(raw, index, weight, ranges, self.clip)
                y = self.masks.index_select(0, at).to(self.device, non_blocking=True).long()
                yield x, y
                continue
            crops = [cut(self.images[p], self.masks[p], self.size, crop_generator(self.seed, i, epoch))
                     for p, i in zip(positions.tolist(), indices)]
            raw = torch.stack([c[0] for c in crops]).to(self.device, non_blocking=True)
            x = self.plan.combine(raw, index, weight, ranges, self.clip)
            yield x, torch.stack([c[1] for c in crops]).to(self.device, non_blocking=True).long()


class _EpochSampler(Sampler):
    """The epoch's order as (position, epoch) keys: persistent workers then draw the right epoch."""

    def __init__(self, batches: _Batches):
        self.batches, self.epoch = batches, 0

    def __len__(self) -> int:
        return self.batches.per_epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((p, self.epoch) for p in self.batches._order(self.epoch).tolist())


class StreamingBatches(_Batches):
    """Batches read from Zarr per sample by DataLoader workers (for stores that do not fit)."""

    residency = "stream"

    def __init__(self, store: Store, indices, plan, geometry: Geometry, normalisation: Normalisation, batch_size,
                 device, seed, shuffle, drop_last, num_workers: int, per_epoch=None, stream=0):
        super().__init__(indices, plan, batch_size, device, seed, shuffle, drop_last, per_epoch, stream)
        self.dataset = StackDataset(store.path, plan, self.indices, geometry, seed, normalisation)
        self.sampler = _EpochSampler(self)
        self.loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=drop_last,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,  # started once, not every epoch
            pin_memory=device.type == "cuda",
        )

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch = epoch
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def make_batch_source(
    store: Store | str | Path,
    indices: Sequence[int],
    plan: CodePlan,
    geometry: Geometry,
    batch_size: int,
    device: str | torch.device,
    residency: Residency = "auto",
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    num_workers: int = 0,
    per_epoch: int | None = None,
    stream: int = 0,
    normalisation: Normalisation = Normalisation(),
) -> ResidentBatches | StreamingBatches:
    """Batches of (x float32 (B, in_channels, size, size), y int64 (B, size, size)) on ``device``:
    random ``geometry.size`` crops at the model's pixel scale, channels normalised by ``normalisation``.

    ``residency``: "ram" or "device" hold the needed data resident, "stream" reads per sample,
    "auto" picks the first of device (CUDA only), ram, stream that fits comfortably.
    ``source.epoch(e)`` iterates one epoch; order and random codes are seeded from (seed, e).
    ``per_epoch`` stacks of ``indices`` are taken each epoch (default all); ``stream`` > 0 shuffles
    them in an order independent of stream 0's (see ``epoch_order``).
    """
    store = store if isinstance(store, Store) else open_store(store)
    check_plan(plan, store)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # so storage and batches compare equal
    if residency not in ("auto", "ram", "device", "stream"):
        raise ConfigError(f"residency must be auto, ram, device or stream, got '{residency}'")
    if residency == "auto":
        needed = resident_bytes(store, indices, len(plan.needed_channels), geometry)
        residency = choose_residency(needed, device)
    if residency == "stream":
        return StreamingBatches(store, indices, plan, geometry, normalisation, batch_size, device, seed, shuffle,
                                drop_last, num_workers, per_epoch, stream)
    storage = device if residency == "device" else torch.device("cpu")
    return ResidentBatches(store, indices, plan, geometry, normalisation, batch_size, device, storage, seed, shuffle,
                           drop_last, per_epoch, stream)
