"""Synthetic hyper-labeled datasets in the on-disk layout users bring (FullImage/, Mask_Norm/, codes.txt).

The paper's datasets cannot be downloaded here, so ``synthesize`` writes look-alikes from simple
imaging physics (``synth_scene`` places cells, ``synth_optics`` images them) — nothing is tuned
toward any training result. Each stack draws from its own generator seeded by (seed, kind, index),
so a stack's bytes depend only on the seed and its name, never on how many stacks are made or on
how many processes make them.
"""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from cellseg.data.layouts import Layout, load_layout
from cellseg.data.synth_optics import FLUORESCENCE_LABELS, Optics
from cellseg.data.synth_scene import make_scene
from cellseg.errors import BadInputError, ConfigError
from cellseg.fileio import atomic_path

CLASSES = ("Background", "Cell")
FIELD_OF_VIEW_UM = 65.0  # a 400 px crop at 0.1625 um/px; other sizes image the same field
SIZE_JITTER = 0.1  # crops are boxes around ROIs: each side varies by up to +-10 % around `size`
MIN_SIZE = 32
_KINDS = {"cell": 0, "negative": 1}
_OUTPUTS = {"FullImage", "Mask_Norm", "codes.txt"}


@dataclass(frozen=True)
class SynthSummary:
    out: Path
    layout: str
    channels: int
    cells: int  # stacks with cells
    negatives: int  # cell-free control stacks
    cells_in_masks: int  # all cells, central and cut neighbours
    min_side: int
    max_side: int
    seconds: float

    def line(self) -> str:
        return (
            f"wrote {self.cells} cell stacks ({self.cells_in_masks} cells in the masks) + {self.negatives} controls, "
            f"layout '{self.layout}' ({self.channels} channels), {self.min_side}-{self.max_side} px, "
            f"to {self.out} in {self.seconds:.1f} s"
        )


@dataclass(frozen=True)
class _Job:
    root: Path
    layout: Layout
    size: int
    seed: int
    kind: str
    index: int

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.index:04d}"


def _check_layout(layout: Layout) -> None:
    """Synthesis needs the physics of every channel: a fluorescence label or a brightfield focus."""
    for ch in layout.channels:
        if ch.kind == "fluorescence" and ch.label in FLUORESCENCE_LABELS:
            continue
        if ch.kind == "brightfield" and ch.z_um is not None:
            continue
        raise ConfigError(
            f"layout '{layout.name}' channel '{ch.name}': synth needs kind 'fluorescence' with a label in "
            f"{', '.join(FLUORESCENCE_LABELS)}, or kind 'brightfield' with z_um"
        )


def _check_counts(cells: int, negatives: int, size: int, seed: int) -> None:
    for option, value in (("cells", cells), ("negatives", negatives), ("seed", seed)):
        if value < 0:
            raise ConfigError(f"--{option} must be >= 0 (got {value})")
    if cells + negatives == 0:
        raise ConfigError("--cells and --negatives are both 0: nothing to synthesise")
    if size < MIN_SIZE:
        raise ConfigError(f"--size must be >= {MIN_SIZE} pixels (got {size})")


def _check_replaceable(out: Path) -> None:
    """Replace a previous synthetic dataset, but never a folder holding anything else."""
    if out.exists() and (not out.is_dir() or not {p.name for p in out.iterdir()} <= _OUTPUTS):
        raise BadInputError(f"{out}: exists and is not a synthetic dataset; choose a new or empty folder")


def render_stack(layout: Layout, size: int, seed: int, kind: str, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One stack: (image uint16 (C, H, W), mask uint8 (H, W) of 0/1, number of cells in the mask)."""
    rng = np.random.default_rng([seed, _KINDS[kind], index])
    h, w = (int(round(size * f)) for f in rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER, 2))
    scene = make_scene(rng, (h, w), FIELD_OF_VIEW_UM / size, with_cells=kind == "cell")
    optics = Optics(scene, rng)
    image = np.stack([optics.channel(ch) for ch in layout.channels])
    return image, (scene.labels > 0).astype(np.uint8), scene.n_cells


def _make(job: _Job) -> tuple[int, int, int]:
    image, mask, n_cells = render_stack(job.layout, job.size, job.seed, job.kind, job.index)
    pixel_um = FIELD_OF_VIEW_UM / job.size
    tifffile.imwrite(
        job.root / "FullImage" / f"{job.name}.ome.tif",
        image,
        ome=True,
        metadata={
            "axes": "CYX",
            "Name": job.name,
            "UUID": uuid.uuid5(uuid.NAMESPACE_URL, f"cellseg-synth/{job.layout.name}/{job.seed}/{job.name}").urn,
            "Channel": {"Name": job.layout.channel_names},
            "PhysicalSizeX": pixel_um,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": pixel_um,
            "PhysicalSizeYUnit": "µm",
        },
    )
    Image.fromarray(mask).save(job.root / "Mask_Norm" / f"{job.name}.png", format="PNG")
    return n_cells, *mask.shape


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def synthesize(
    out: str | os.PathLike,
    layout: str | os.PathLike | Layout = "trainer",
    cells: int = 275,
    negatives: int = 175,
    size: int = 400,
    seed: int = 0,
    workers: int | None = None,
) -> SynthSummary:
    """Write a synthetic dataset to ``out`` (replaced as a whole, atomically).

    ``workers``: processes to use; by default one per available CPU for large sets, one for tiny ones.
    The output does not depend on it.
    """
    start = time.perf_counter()
    out = Path(out)
    layout = layout if isinstance(layout, Layout) else load_layout(layout)
    _check_layout(layout)
    _check_counts(cells, negatives, size, seed)
    _check_replaceable(out)
    total = cells + negatives
    if workers is None:
        workers = min(_available_cpus(), max(1, total * size * size // (16 * 400 * 400)))
    with atomic_path(out) as root:
        (root / "FullImage").mkdir(parents=True)
        (root / "Mask_Norm").mkdir()
        (root / "codes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
        jobs = [_Job(root, layout, size, seed, "cell", i) for i in range(cells)]
        jobs += [_Job(root, layout, size, seed, "negative", i) for i in range(negatives)]
        if workers <= 1:
            results = [_make(job) for job in jobs]
        else:
            context = get_context("forkserver")  # never fork a parent that may hold threads (torch)
            context.set_forkserver_preload(["cellseg.data.synth"])  # import once, not per worker
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
            try:
                results = list(pool.map(_make, jobs, chunksize=4))
            finally:
                pool.shutdown(cancel_futures=True)
    sides = [s for _, h, w in results for s in (h, w)]
    return SynthSummary(
        out=out,
        layout=layout.name,
        channels=layout.n_channels,
        cells=cells,
        negatives=negatives,
        cells_in_masks=sum(n for n, _, _ in results[:cells]),
        min_side=min(sides),
        max_side=max(sides),
        seconds=time.perf_counter() - start,
    )
