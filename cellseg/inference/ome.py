"""Predicted cells of an ingested store as OME-Zarr (NGFF 0.5 on Zarr v3), so napari (napari-ome-zarr, whose
reader is ome-zarr-py) and other NGFF viewers open the image with its cells as a labels layer.

``OUT/labels.zarr/NAME`` is one NGFF image per stack: the channels the model read (axes c, y, x; named in
``omero``) with the cells in ``labels/cells`` (image-label, axes y, x), one resolution level each. The image
is copied because NGFF attaches labels to an image group and the store's own groups are not NGFF images;
stacks of different sizes each get their own image because NGFF 0.5 has no collection of images (the root
is a plain Zarr group).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.storage import LocalStore

from cellseg.inference.instances import compact

NGFF = "0.5"


def _level(group: zarr.Group, data: np.ndarray, pixel_size: float | None, **ome) -> None:
    """``data`` as the group's only resolution level "0" with its ``multiscales`` (and ``ome``) metadata;
    a leading third axis is the channel axis. Scale in µm when ``pixel_size`` is known, else in pixels."""
    unit = {"unit": "micrometer"} if pixel_size else {}
    axes = [{"name": "c", "type": "channel"}] * (data.ndim == 3) + [
        {"name": n, "type": "space", **unit} for n in "yx"]
    scale = [1.0] * (data.ndim == 3) + [float(pixel_size or 1.0)] * 2
    group.create_array("0", data=data, dimension_names=[a["name"] for a in axes], overwrite=True)
    multiscale = {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": scale}]}]}
    group.attrs["ome"] = {"version": NGFF, "multiscales": [multiscale], **ome}


def write_ome_zarr(path: Path, name: str, channels: np.ndarray, channel_names: list[str], labels: np.ndarray,
                   pixel_size: float | None = None) -> Path:
    """Write stack ``name`` (integer ``channels`` K×H×W, their ``channel_names``, its label image) into the
    OME-Zarr at ``path`` (created if missing; the stack's earlier image there is replaced)."""
    root = zarr.open_group(LocalStore(path), mode="a", zarr_format=3)
    image = root.require_group(name)  # ids with '/' nest; parents are plain groups
    windows = [{"min": 0, "max": float(np.iinfo(channels.dtype).max), "start": float(c.min()), "end": float(c.max())}
               for c in channels]
    _level(image, channels, pixel_size, omero={"channels": [
        {"label": n, "color": "FFFFFF", "active": True, "window": w} for n, w in zip(channel_names, windows)]})
    group = image.require_group("labels")
    group.attrs["ome"] = {"version": NGFF, "labels": ["cells"]}
    label = {"source": {"image": "../../"}}  # the image group; ome-zarr-py shows it only when named
    _level(group.require_group("cells"), compact(labels), pixel_size, **{"image-label": label})
    return path / name
