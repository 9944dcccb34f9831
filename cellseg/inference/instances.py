"""Cells as instances: one label per cell from a model's class probabilities or from a binary mask.

The semantic model only says cell or background, so touching cells form one foreground blob. A blob with
two or more seeds is split by a seeded watershed on its distance transform: seeds are the maxima of the
(smoothed) distance to the background, at least about half a cell diameter apart; a blob with one seed
(most, and those too small to have one) is one cell as it is, which keeps the watershed off most pixels.
The diameter is the one cells have in the input (``--diameter``), else the median the model's training
masks had (recorded in its geometry), else ``DEFAULT_DIAMETER`` for models saved before that record.
The same labelling of an Otsu-thresholded image is the classical baseline (Otsu + distance-transform
watershed).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from cellseg.errors import ConfigError
from cellseg.fileio import atomic_path
from cellseg.model.loading import TrainedModel

CELL = "cell"
BOUNDARY = "boundary"
DEFAULT_DIAMETER = 30.0  # native px, when a model records none: cellpose's default diameter
SEED_SPACING = 0.4  # seeds at least this many diameters apart (two touching cells: 1 diameter)
SMOOTHING = 0.1  # sigma of the distance smoothing, in diameters: ridges of elongated cells give one seed
MIN_AREA = 0.1  # smallest object kept, as a fraction of a disk of one diameter


def cell_class(trained: TrainedModel, required_by: str | None = None) -> int | None:
    """Index of the model's "Cell" class (None without one, or a one-line ConfigError naming the option
    ``required_by`` that needs it)."""
    classes = [str(c) for c in trained.metadata.get("classes", [])]
    lower = [c.lower() for c in classes]
    if int(trained.metadata["num_classes"]) >= 2 and CELL in lower:
        return lower.index(CELL)
    if required_by is None:
        return None
    raise ConfigError(f"{required_by}: model {trained.uri} has no cell class "
                      f"(its classes: {', '.join(classes) or 'none recorded'})")


def cell_diameter(trained: TrainedModel, diameter: float | None = None) -> float:
    """Expected cell diameter in the input's native pixels: ``diameter`` (``--diameter``), else the
    training masks' median recorded with the model, else ``DEFAULT_DIAMETER`` (older models)."""
    recorded = (trained.metadata.get("geometry") or {}).get("cell_diameter")
    return float(diameter or recorded or DEFAULT_DIAMETER)


def boundary_class(trained: TrainedModel) -> int | None:
    """Index of the model's "Boundary" class (cell edges, trained from instance masks), if it has one."""
    lower = [str(c).lower() for c in trained.metadata.get("classes", [])]
    return lower.index(BOUNDARY) if BOUNDARY in lower else None


def _is_argmax(probs: np.ndarray, k: int) -> np.ndarray:
    """argmax == k, without np.argmax over the class axis (30x slower at 2048²): more than every class
    before it, at least every class after it (argmax takes the first of equal maxima)."""
    mask = np.ones(probs.shape[1:], bool)
    if k > 0:
        mask &= probs[k] > probs[:k].max(axis=0)
    if k + 1 < len(probs):
        mask &= probs[k] >= probs[k + 1 :].max(axis=0)
    return mask


def instances_from_probabilities(probs, cell: int = 1, diameter: float = DEFAULT_DIAMETER,
                                 boundary: int | None = None) -> np.ndarray:
    """Label image from class probabilities (num_classes, H, W) (tensor or array). Without a ``boundary``
    class: pixels whose most probable class is ``cell``, split by ``label_instances``. With one, the cell
    interiors the model separated by boundary pixels are the seeds, grown over cell and boundary pixels."""
    if hasattr(probs, "detach"):
        probs = probs.detach().cpu().numpy()
    interior = _is_argmax(probs, cell)
    if boundary is None:
        return label_instances(interior, diameter)
    from skimage.segmentation import relabel_sequential, watershed

    seeds, _ = ndimage.label(interior)
    labels = watershed(probs[boundary], seeds, mask=interior | _is_argmax(probs, boundary))
    areas = np.bincount(labels.ravel())
    labels[areas[labels] < MIN_AREA * math.pi * diameter**2 / 4] = 0
    return compact(relabel_sequential(labels)[0])


def label_instances(mask: np.ndarray, diameter: float = DEFAULT_DIAMETER) -> np.ndarray:
    """Label image (uint16, or uint32 beyond 65535 cells; 0 = background) of a binary mask: holes
    filled, seeded distance-transform watershed, objects under ``MIN_AREA`` of a cell dropped."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import relabel_sequential, watershed

    mask = ndimage.binary_fill_holes(np.asarray(mask, bool))
    blobs, _ = ndimage.label(mask)
    distance = ndimage.distance_transform_edt(mask).astype(np.float32)
    distance = ndimage.gaussian_filter(distance, SMOOTHING * diameter)
    peaks = peak_local_max(distance, min_distance=max(1, round(SEED_SPACING * diameter)), labels=blobs,
                           exclude_border=False)
    several = (np.bincount(blobs[tuple(peaks.T)], minlength=blobs.max() + 1) >= 2)[blobs]
    seeds = np.zeros(mask.shape, np.int32)
    seeds[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance, seeds, mask=several)
    labels = np.where(mask & ~several, blobs + len(peaks), labels)
    areas = np.bincount(labels.ravel())  # (remove_small_objects changed its size argument in 0.26)
    labels[areas[labels] < MIN_AREA * math.pi * diameter**2 / 4] = 0
    return compact(relabel_sequential(labels)[0])


def compact(labels: np.ndarray) -> np.ndarray:
    """``labels`` as uint16 when its ids fit, else uint32."""
    fits = int(labels.max(initial=0)) <= np.iinfo(np.uint16).max
    return labels.astype(np.uint16 if fits else np.uint32, copy=False)


def write_labels(path: Path, labels: np.ndarray, pixel_size: float | None = None) -> Path:
    """Write a label image as OME-TIFF (uint16, or uint32 when its ids need it), atomically: the OME-XML
    (axes YX, the pixel size in µm when known) is what Fiji/Bio-Formats, napari and QuPath read."""
    import tifffile

    metadata: dict = {"axes": "YX"}
    if pixel_size:
        metadata |= {"PhysicalSizeX": pixel_size, "PhysicalSizeXUnit": "µm",
                     "PhysicalSizeY": pixel_size, "PhysicalSizeYUnit": "µm"}
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, compact(labels), ome=True, metadata=metadata, compression="zlib")
    return path
