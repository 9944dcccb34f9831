"""Per-cell measurements of a label image: the table a lab counts and plots cells from.

scikit-image's ``regionprops_table`` measures; this module only names the columns in the user's words
(channels by their layout names) and checks the table against ``CELLS_SCHEMA``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cellseg.data.schemas import CELLS_SCHEMA, validate

_PROPERTIES = ("label", "area", "centroid", "bbox", "eccentricity", "intensity_mean", "intensity_max")
_RENAME = {"area": "area_px", "centroid-0": "centroid_y", "centroid-1": "centroid_x",
           "bbox-0": "bbox_y0", "bbox-1": "bbox_x0", "bbox-2": "bbox_y1", "bbox-3": "bbox_x1"}


def cell_table(labels: np.ndarray, channels: np.ndarray, names: Sequence[str], pixel_size: float | None = None,
               where: str | Path = "cells") -> pd.DataFrame:
    """One row per cell of ``labels`` (H, W): area (µm² only with ``pixel_size``, µm per pixel),
    centroid, bounding box, eccentricity and mean/max of each of ``channels`` (K, H, W), named by ``names``."""
    from skimage.measure import regionprops_table

    props = regionprops_table(labels, intensity_image=np.moveaxis(channels, 0, -1),
                              properties=_PROPERTIES)
    rename = {**_RENAME, **{f"intensity_{stat}-{k}": f"{stat}_{name}"
                            for stat in ("mean", "max") for k, name in enumerate(names)}}
    table = pd.DataFrame(props).rename(columns=rename)
    area_um2 = table["area_px"] * pixel_size**2 if pixel_size else np.nan
    table.insert(table.columns.get_loc("area_px") + 1, "area_um2", area_um2)
    return validate(table, CELLS_SCHEMA, where)
