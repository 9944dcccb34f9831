"""How each channel of a store looks to a threshold: the statistics behind ``cellseg data qc``.

A lab compares its own microscope with the synthetic stacks (or two acquisitions) by numbers that
say how hard a channel is to segment, not how pretty it is. Regions, in a stack's native pixels
(mask = every pixel of a class other than background):

- interior: the mask eroded by 4 px; edge: the mask's 2 px inner band; background: outside the
  mask dilated by 6 px (halos around a cell belong to neither).
- ``interior_contrast`` = |mean(interior) − mean(background)| / mean(background): a fill a
  threshold can find (fluorescence: large; a transparent cell in brightfield: ~0).
- ``edge_contrast`` = mean(|I − mean(background)|) over the edge / mean(background): halos of
  either sign (brightfield edges go dark on one side of focus and bright on the other).
- ``otsu_dice``: Dice against the mask of the better side of Otsu's threshold — how far a plain
  threshold gets on this channel alone.
- ``snr`` = |mean(cell) − mean(background)| / sd(background).
- ``floor``: share of pixels within 0.5 % of the channel's range above its minimum (clipped to
  black); ``saturated``: share at the dtype's maximum.

A store's value is the median over its stacks with cells (at most ``max_stacks``, evenly spaced).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from cellseg.errors import BadInputError

INTERIOR_ERODE_PX = 4
EDGE_BAND_PX = 2
BACKGROUND_DILATE_PX = 6
FLOOR_RANGE = 0.005
STATISTICS = ("interior_contrast", "edge_contrast", "otsu_dice", "snr", "floor", "saturated")
MIN_REGION_PX = 4


@dataclass(frozen=True)
class Regions:
    """The pixel sets every statistic is measured on."""

    cell: np.ndarray
    interior: np.ndarray
    edge: np.ndarray
    background: np.ndarray

    @classmethod
    def of(cls, mask: np.ndarray) -> Regions | None:
        """None when the mask leaves a region too small to measure (no cell, or nothing but cell)."""
        cell = np.asarray(mask) > 0
        interior = ndimage.binary_erosion(cell, iterations=INTERIOR_ERODE_PX)
        edge = cell & ~ndimage.binary_erosion(cell, iterations=EDGE_BAND_PX)
        background = ~ndimage.binary_dilation(cell, iterations=BACKGROUND_DILATE_PX)
        if min(interior.sum(), edge.sum(), background.sum()) < MIN_REGION_PX:
            return None
        return cls(cell, interior, edge, background)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def otsu_dice(plane: np.ndarray, cell: np.ndarray) -> float:
    """Dice of the better side of Otsu's threshold (cells may be brighter or darker than background)."""
    from skimage.filters import threshold_otsu

    above = plane > threshold_otsu(plane)
    return max(_dice(above, cell), _dice(~above, cell))


def plane_statistics(plane: np.ndarray, regions: Regions) -> dict[str, float]:
    """Every statistic of one channel of one stack; NaN for a constant plane (nothing to threshold)."""
    values = np.asarray(plane, np.float64)
    full_scale = float(np.iinfo(plane.dtype).max) if np.issubdtype(plane.dtype, np.integer) else np.inf
    low, high = float(values.min()), float(values.max())
    clipped = {"floor": np.nan, "saturated": float((values >= full_scale).mean())}
    if high == low:
        return {**dict.fromkeys(STATISTICS, np.nan), **clipped}
    bg = values[regions.background]
    bg_mean, bg_sd = float(bg.mean()), float(bg.std())
    scale = max(abs(bg_mean), 1e-6 * (high - low))
    return {
        "interior_contrast": abs(float(values[regions.interior].mean()) - bg_mean) / scale,
        "edge_contrast": float(np.abs(values[regions.edge] - bg_mean).mean()) / scale,
        "otsu_dice": otsu_dice(values, regions.cell),
        "snr": abs(float(values[regions.cell].mean()) - bg_mean) / max(bg_sd, 1e-6 * (high - low)),
        "floor": float((values <= low + FLOOR_RANGE * (high - low)).mean()),
        "saturated": clipped["saturated"],
    }


def stack_statistics(image: np.ndarray, mask: np.ndarray, channel_names: list[str]) -> pd.DataFrame | None:
    """One row per channel of one stack (C, H, W); None when its mask cannot be measured."""
    regions = Regions.of(mask)
    if regions is None:
        return None
    rows = [{"channel": name, **plane_statistics(plane, regions)} for name, plane in zip(channel_names, image)]
    return pd.DataFrame(rows)


def _measurable(store, max_stacks: int) -> list[int]:
    """Stacks with cells, evenly spaced, at most ``max_stacks``."""
    cells = [i for i, negative in enumerate(store.manifest["negative"]) if not negative]
    if not cells:
        raise BadInputError(f"{store.path}: no stack with cells in its mask; qc measures cells against background")
    picks = np.unique(np.linspace(0, len(cells) - 1, min(max_stacks, len(cells))).round().astype(int))
    return [cells[p] for p in picks]


def store_statistics(store, label: str, max_stacks: int = 50) -> pd.DataFrame:
    """Per channel: the median of every statistic over the store's measurable stacks, and their count."""
    from cellseg.data.schemas import QC_SCHEMA, validate

    names = store.layout.channel_names
    frames = [f for i in _measurable(store, max_stacks)
              if (f := stack_statistics(store.read_image(i), store.read_mask(i), names)) is not None]
    if not frames:
        raise BadInputError(f"{store.path}: no stack whose cells are large enough to measure "
                            f"(an interior needs cells wider than {2 * INTERIOR_ERODE_PX} px)")
    stacked = pd.concat(frames)
    table = stacked.groupby("channel", sort=False)[list(STATISTICS)].median().reset_index()
    table.insert(0, "store", label)
    table["stacks"] = len(frames)
    table["constant"] = stacked.groupby("channel", sort=False)["otsu_dice"].apply(lambda s: bool(s.isna().all())).values
    return validate(table, QC_SCHEMA, store.path)


def side_by_side(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Rows of several stores' tables interleaved channel by channel (channels matched by name)."""
    combined = pd.concat(tables, ignore_index=True)
    order = {name: k for k, name in enumerate(dict.fromkeys(combined["channel"]))}
    return combined.sort_values("channel", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


def markdown(table: pd.DataFrame) -> str:
    """The table as printed: constant channels say so instead of a row of NaN."""
    header = ["store", "channel", *STATISTICS, "stacks"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.itertuples(index=False):
        cells = [row.store, row.channel]
        if row.constant:
            cells += ["constant channel"] + [""] * (len(STATISTICS) - 1)
        else:
            cells += [f"{getattr(row, s):.3f}" if s != "snr" else f"{row.snr:.1f}" for s in STATISTICS]
        lines.append("| " + " | ".join(cells + [str(row.stacks)]) + " |")
    return "\n".join(lines)


def _caption(channel: str, measured: pd.DataFrame) -> str:
    if channel not in measured.index or measured.at[channel, "constant"]:
        return f"{channel}\nconstant"
    return f"{channel}\nOtsu {measured.at[channel, 'otsu_dice']:.2f} · edge {measured.at[channel, 'edge_contrast']:.2f}"


def example_planes(store) -> list[np.ndarray]:
    """Every channel of the store's first measurable stack as grey RGB (1st-99.8th percentile), the
    mask's outline in green — what the numbers describe, at a glance."""
    from cellseg.visualize import TRUTH_COLOUR, outlines

    i = _measurable(store, 1)[0]
    image, mask = store.read_image(i).astype(np.float32), store.read_mask(i)
    edge = outlines(mask > 0)
    planes = []
    for plane in image:
        low, high = np.percentile(plane, (1.0, 99.8))
        grey = np.clip((plane - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        rgb[edge] = TRUTH_COLOUR
        planes.append(rgb)
    return planes


def write_report(stores: list, labels: list[str], table: pd.DataFrame, out: Path) -> list[Path]:
    """OUT/qc.csv (schema-checked) and OUT/qc.png (one row of example planes per store)."""
    from cellseg.data.schemas import QC_SCHEMA, validate
    from cellseg.fileio import write_text
    from cellseg.plots import image_table, save_figure

    out.mkdir(parents=True, exist_ok=True)
    csv = write_text(out / "qc.csv", validate(table, QC_SCHEMA, out / "qc.csv").to_csv(index=False))
    rows, captions = [], []
    for store, label in zip(stores, labels):
        measured = table[table["store"] == label].set_index("channel")
        rows.append(example_planes(store))
        captions.append([_caption(name, measured) for name in store.layout.channel_names])
    fig = image_table(rows, [], captions=captions, row_titles=labels,
                      heading="Example planes of each store (mask outline green)")
    return [csv, save_figure(fig, out / "qc.png")]


def log_report(table: pd.DataFrame, files: list[Path], labels: list[str], experiment: str,
               tracking_uri: str | None) -> str:
    """One MLflow run ``qc <stores>``: a metric per store, channel and statistic, the files as artifacts."""
    from cellseg.tracking.studies import tracked_run

    metrics = {f"{row['store']}.{row['channel']}.{stat}": float(row[stat])
               for row in table.to_dict(orient="records") for stat in STATISTICS if not pd.isna(row[stat])}
    with tracked_run(f"qc {' vs '.join(labels)}", "qc", tracking_uri, experiment) as run:
        run.log_params({"stores": ", ".join(labels), "stacks": int(table["stacks"].max())})
        run.log_metrics(metrics)
        run.log_artifacts(files, "qc")
    return run.run_id
