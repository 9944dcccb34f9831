"""Everything one training run is made of, built once from the config, plus its primitive steps.

``TrainingSession`` opens the store, resolves the loading codes, fixes the split (reusing the run
folder's ``split.json`` when there is one, as nnU-Net does), builds the batch sources, model, loss
and augmentation on the training device, and offers the steps every experiment drives:
``train_batches``, ``train_step``, ``evaluate``, ``predict``. ``fit`` (loop.py) runs the schedule
with them; the LR finder drives ``train_step`` with its own learning rates. Construction is
deterministic from ``config.seed``. In a distributed run (distributed.py) each rank builds its
shard of the batches and trains the shared model through DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellseg.config import Config
from cellseg.data.batches import make_batch_source
from cellseg.data.codes import resolve_codes
from cellseg.data.geometry import median_cell_diameter
from cellseg.data.split import Split, make_split
from cellseg.data.store import open_store
from cellseg.engine import distributed
from cellseg.engine.augment import build_augment
from cellseg.engine.losses import weighted_cross_entropy
from cellseg.engine.metrics import SegmentationMetrics
from cellseg.errors import ConfigError
from cellseg.model import build_model
from cellseg.model.weights import describe_encoder_weights
from cellseg.run_folder import SPLIT_NAME

# What a model records of its input: 1 no geometry or normalisation (native tiles, per-channel maximum),
# 2 no input recipe (its codes resolved with the definitions of the day), 3 both.
INPUT_SCHEMA = 3


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainingSession:
    """Store, codes, split, batch sources, model, loss and augmentation for ``config``."""

    def __init__(self, config: Config, run_dir: str | Path, split: Split | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        data, train = config.data, config.train
        if data.store is None:
            raise ConfigError("no training data: pass --data STORE (or set data.store in the config)")
        self.world = distributed.world()
        launched = distributed.launched()
        if launched.size > self.world.size:
            raise ConfigError(f"started by torchrun as {launched.size} processes, but only `cellseg train` trains "
                              "data-parallel; run this as a single process")
        self.device = resolve_device(train.device)
        if self.cuda and self.world.size > 1:  # this rank's GPU (process_group made it the current one)
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.cuda:  # fastest kernels for the fixed training size; bitwise GPU repeats are not promised
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
        seed_everything(config.seed)
        self.store = open_store(data.store)
        if len(self.store.classes) != config.model.num_classes:
            raise ConfigError(
                f"model.num_classes is {config.model.num_classes} but store {data.store} has "
                f"{len(self.store.classes)} classes ({', '.join(self.store.classes)})"
            )
        self.plan = resolve_codes(
            data.codes if data.codes is not None else (data.strategy or ""),
            self.store.layout,
            channel_dropout=data.channel_dropout,
            merge_dropout=data.merge_dropout,
        )
        self.split = split or self._existing_split() or make_split(self.store, data.val_fraction, config.seed)
        train_idx, val_idx = self.split.indices(self.store)
        per_rank = len(train_idx) // self.world.size  # every rank takes as many steps
        if per_rank == 0:
            raise ConfigError(f"{data.store}: the split leaves {len(train_idx)} stacks for training, fewer than the "
                              f"{self.world.size} processes")
        self.geometry, self.normalisation = data.geometry(), data.normalisation()
        self.cell_diameter = median_cell_diameter([self.store.read_mask(i) for i in train_idx])
        common = dict(plan=self.plan, geometry=self.geometry, normalisation=self.normalisation,
                      batch_size=train.batch_size, device=self.device, residency=data.residency, seed=config.seed,
                      num_workers=data.num_workers)
        # fastai drops the last short training batch (batch norm dislikes a batch of one).
        self.train_source = make_batch_source(self.store, self.world.shard(train_idx), shuffle=True,
                                              drop_last=per_rank >= train.batch_size, per_epoch=per_rank,
                                              stream=self.world.rank, **common)
        self.val_source = make_batch_source(self.store, self.world.shard(val_idx), shuffle=False, drop_last=False,
                                            **common)
        self.model = build_model(config.model.encoder, self.plan.in_channels, config.model.num_classes,
                                 config.model.encoder_weights).to(self.device)
        if self.world.size > 1:
            distributed.sync_batch_norm(self.model, self.device)
            seed_everything(distributed.rank_seed(config.seed, self.world.rank))  # own augmentation draws
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.trainer = self.model  # what train_step runs: the model, or DDP around it (wrap_for_training)
        self.loss_fn = weighted_cross_entropy(train.ce_weights, config.model.num_classes).to(self.device)
        self.augment = build_augment(config.augment, data.size)
        self.history: list[dict[str, Any]] = []
        self.optimizer: torch.optim.Optimizer | None = None  # of the cycle in progress (set by fit)
        self.scheduler = None
        self.cycles: list = []  # the run's schedule and where this process started in it (set by fit)
        self.start_epoch = 0

    @property
    def cuda(self) -> bool:
        """On CUDA: bf16 autocast and channels-last (on the CPU channels-last gains only 2-19 % per step,
        docs/benchmarks.md, so CPU training stays contiguous)."""
        return self.device.type == "cuda"

    def _existing_split(self) -> Split | None:
        path = self.run_dir / SPLIT_NAME
        return Split.load(path) if path.is_file() else None

    def autocast(self):
        """bf16 autocast on CUDA; plain fp32 on the CPU."""
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cuda else x

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The augmented training batches of (0-based, global) ``epoch``, on the device."""
        for x, y in self.train_source.epoch(epoch):
            if self.augment is not None:
                x, y = self.augment(x, y)
            yield self._layout(x), y

    def wrap_for_training(self) -> None:
        """Wrap the model for data-parallel training over the parameters now trainable (after
        freezing or unfreezing; a no-op in a single process)."""
        self.trainer = None  # release the previous wrapper's gradient hooks first
        self.trainer = distributed.wrap(self.model, self.device)

    def unwrap(self) -> None:
        """Back to the plain model with plain BatchNorm, as it is saved and logged."""
        self.trainer = self.model
        if self.world.size > 1:
            distributed.local_batch_norm(self.model)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One forward/backward/optimizer step; returns the (detached) batch loss without syncing.

        In a distributed run the loss is this rank's share of the global batch's weighted mean
        (DDP averages gradients over ranks, so each share is scaled by its weight over the mean weight).
        """
        self.trainer.train()
        with self.autocast():
            logits = self.trainer(x)
        loss = self.loss_fn(logits.float(), y)
        if self.world.size > 1:
            weight = (self.loss_fn.weight[y].sum() if self.loss_fn.weight is not None
                      else torch.full((), float(y.numel()), device=y.device))
            loss = loss * (weight * self.world.size / distributed.all_reduce_sum(weight.clone()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def recalibrate_batch_norm(self, epoch: int) -> None:
        """Precise BatchNorm: the running statistics become the exact average over ``epoch``'s training
        batches, unaugmented as at inference. Their usual exponential average lags behind weights that
        change fast: after a short run of small batches it still holds much of the initial values, and
        in eval mode the model then predicts background everywhere (quick profile: cell Dice 0.00 before,
        0.84 after). One forward pass over the training set; synchronised over the ranks of a DDP run."""
        with self.autocast():
            torch.optim.swa_utils.update_bn((self._layout(x) for x, _ in self.train_source.epoch(epoch)), self.model)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss, pixel/background/cell accuracy, cell Dice and IoU over the whole val split."""
        self.model.eval()
        metrics = SegmentationMetrics(self.loss_fn, self.config.model.num_classes, self.device)
        for x, y in self.val_source.epoch(0):  # the same loading-code draws every epoch
            with self.autocast():
                logits = self.model(self._layout(x))
            metrics.update(logits, y)
        return metrics.compute()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class labels (B, H, W) for a batch already on the device."""
        self.model.eval()
        with self.autocast():
            return self.model(self._layout(x)).argmax(1)

    def metadata(self) -> dict[str, Any]:
        """What a saved model needs to be used again (the MLflow model's metadata): its inputs'
        loading codes and their ``recipe`` (each code resolved: operation, channels, dropout; so no
        codes file is needed later), layout, pixel scale (``geometry``, with the training masks' median
        cell diameter in native pixels) and intensity ``normalisation`` — inference repeats exactly these."""
        data = self.config.data
        return {
            "input_schema": INPUT_SCHEMA,
            "geometry": {**self.geometry.to_dict(), "cell_diameter": self.cell_diameter},
            "normalisation": self.normalisation.to_dict(),
            "codes": list(self.plan.codes),
            "recipe": [r.model_dump(mode="json") for r in self.plan.records],
            "strategy": self.plan.strategy,
            "layout": self.store.layout.model_dump(mode="json"),
            "classes": list(self.store.classes),
            "size": data.size,
            "in_channels": self.plan.in_channels,
            "num_classes": self.config.model.num_classes,
            "channel_dropout": data.channel_dropout,
            "merge_dropout": data.merge_dropout,
            "encoder": self.config.model.encoder,
            "encoder_weights": describe_encoder_weights(self.config.model.encoder, self.config.model.encoder_weights),
        }
