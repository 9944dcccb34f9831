"""The per-sample view of a store: one stack in, (float32 C×H×W input, int64 H×W mask) out.

Used by notebooks, tests, ``cellseg codes render`` and the streaming batch path. Draws the
loading codes with a generator seeded from (seed, stack index, epoch), so a sample's draw does
not depend on which worker, batch or subset it is loaded in; then reads only the channels that
draw uses, brings them to the model's pixel scale (geometry.py), cuts the sample's random crop
(its own seeded generator) and combines them, each channel normalised by its intensity range over
the native stack (intensity.py, ``CodePlan.combine``). The resident batch path (batches.py) reuses
the same view, draw, crop and combine, so both paths build identical inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cellseg.data.codes import CodePlan, resolve_codes
from cellseg.data.geometry import Geometry, crop_origin, training_view
from cellseg.data.intensity import Normalisation
from cellseg.data.store import Store, open_store
from cellseg.errors import ConfigError

_ORDER, _SAMPLE, _CROP = 0, 1, 2  # domain tags, so order, draw and crop seeds never coincide


_MASK64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derived_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by hashing integer keys (seed, tag, index, epoch) with splitmix64.

    Cheap enough to make one per sample and per batch, unlike ``numpy.random.SeedSequence``.
    """
    state = 0
    for key in keys:
        state = _splitmix64(state ^ (int(key) & _MASK64))
    return torch.Generator().manual_seed(state)


def sample_generator(seed: int, index: int, epoch: int) -> torch.Generator:
    """The generator for the loading-code draw of stack ``index`` in ``epoch``."""
    return derived_generator(seed, _SAMPLE, index, epoch)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True, stream: int = 0) -> torch.Tensor:
    """Positions 0..n-1 in this epoch's order (a seeded permutation when shuffling); ``stream`` > 0
    gives an independent order (each rank of a distributed run shuffles its own shard)."""
    if not shuffle:
        return torch.arange(n)
    keys = (seed, _ORDER, epoch) if stream == 0 else (seed, _ORDER, epoch, stream)
    return torch.randperm(n, generator=derived_generator(*keys))


def crop_generator(seed: int, index: int, epoch: int) -> torch.Generator:
    """The generator for the random crop of stack ``index`` in ``epoch`` (independent of its code draw)."""
    return derived_generator(seed, _CROP, index, epoch)


def load_view(store: Store, index: int, channels: Sequence[int], geometry: Geometry | None,
              normalisation: Normalisation, cache: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack ``index``'s ``channels`` at the network's pixel scale: (uint16 (K, h, w), mask (h, w),
    intensity ranges (K, 2) of the native channels). ``geometry`` None keeps native pixels. ``cache``
    keeps each (stack, channel)'s range: a percentile costs milliseconds per plane, every epoch."""
    raw, mask = store.read_image(index, channels), store.read_mask(index)
    if cache is None:
        ranges = normalisation.ranges(raw)
    else:
        missing = [k for k, c in enumerate(channels) if (index, c) not in cache]
        if missing:
            cache.update(zip([(index, channels[k]) for k in missing], normalisation.ranges(raw[missing])))
        ranges = np.stack([cache[index, c] for c in channels])
    if geometry is not None:
        raw, mask = training_view(raw, mask, geometry)
    return raw, mask, ranges


def cut(raw, mask, size: int, generator: torch.Generator):
    """A random ``size`` crop of a view (numpy or torch; a view of exactly ``size`` is returned whole)."""
    y, x = crop_origin(mask.shape[-2], mask.shape[-1], size, generator)
    return raw[..., y:y + size, x:x + size], mask[y:y + size, x:x + size]


def check_plan(plan: CodePlan, store: Store) -> None:
    """A plan resolved for another layout would read the wrong channels: refuse it."""
    if (plan.layout.name, plan.layout.channel_names) != (store.layout.name, store.layout.channel_names):
        raise ConfigError(
            f"loading codes {plan.codes} were resolved for layout '{plan.layout.name}', "
            f"but store {store.path} has layout '{store.layout.name}'"
        )


class StackDataset(Dataset):
    """Stacks of a store as (input, mask) samples; see ``open_dataset``."""

    def __init__(self, store_path: Path, plan: CodePlan, indices: Sequence[int], geometry: Geometry | None,
                 seed: int, normalisation: Normalisation = Normalisation()):
        self.store_path = Path(store_path)
        self.plan = plan
        self.indices = [int(i) for i in indices]
        self.geometry = geometry
        self.normalisation = normalisation
        self.seed = seed
        self.epoch = 0
        self._store: Store | None = None
        self._ranges: dict = {}  # (stack, channel) -> intensity range, filled as samples are read

    @property
    def store(self) -> Store:
        if self._store is None:  # opened lazily, so each DataLoader worker opens its own
            self._store = open_store(self.store_path)
        return self._store

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None, "_ranges": {}}

    def set_epoch(self, epoch: int) -> None:
        """Draw the random codes of ``epoch`` (same epoch, same draw)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``key`` (a position, or (position, epoch) as the streaming sampler passes it).

        Draws first, then reads only the channels the draw uses (a random code reads one of its list),
        brings them to the model's pixel scale and cuts the sample's random crop.
        """
        position, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        index = self.indices[position]
        where, weight = self.plan.draw(1, sample_generator(self.seed, index, epoch))
        used = torch.unique(where[weight != 0])
        used = used if len(used) else torch.zeros(1, dtype=torch.int64)  # all black: still need H, W
        channels = [self.plan.needed_channels[k] for k in used.tolist()]
        raw, mask, ranges = load_view(self.store, index, channels, self.geometry, self.normalisation, self._ranges)
        if self.geometry is not None:
            raw, mask = cut(raw, mask, self.geometry.size, crop_generator(self.seed, index, epoch))
        compact = torch.zeros(len(self.plan.needed_channels), dtype=torch.int64)
        compact[used] = torch.arange(len(used))
        x = self.plan.combine(torch.from_numpy(np.ascontiguousarray(raw))[None], compact[where], weight,
                              torch.from_numpy(ranges)[None], self.normalisation.clips)
        return x[0], torch.from_numpy(np.ascontiguousarray(mask)).long()


def open_dataset(
    store_path: str | Path,
    codes: str | Sequence[int] | CodePlan,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    geometry: Geometry | None = None,
    channel_dropout: float = 0.5,
    merge_dropout: float = 0.5,
    normalisation: Normalisation = Normalisation(),
) -> StackDataset:
    """A torch Dataset over a store's stacks (all, or ``indices``): native pixels, or the training
    samples of ``geometry`` (its pixel scale and random crops).

    ``codes``: a list of codes, a strategy name, ``"100,12,103"`` or a resolved ``CodePlan``.
    Unknown codes or channels the store's layout lacks raise ConfigError here, before any reading.
    """
    store = open_store(store_path)
    plan = codes if isinstance(codes, CodePlan) else resolve_codes(codes, store.layout, channel_dropout, merge_dropout)
    check_plan(plan, store)
    chosen = range(len(store)) if indices is None else indices
    bad = [i for i in chosen if not 0 <= int(i) < len(store)]
    if bad:
        raise IndexError(f"stack indices {bad[:5]} out of range for {len(store)} stacks")
    dataset = StackDataset(Path(store_path), plan, chosen, geometry, seed, normalisation)
    dataset._store = store
    return dataset
