"""Geometry of a synthetic subimage: where the cells, their nuclei and the debris are.

A subimage is a crop around one cell (the ROI): that cell sits near the centre, whole; a few
neighbours overlap the crop's border and are cut by it. Cells are star-shaped (a disc with random
low-order harmonics and a few thin, tapering protrusions), never touch each other, and carry an
elliptical nucleus. Everything is in pixels; ``pixel_um`` converts to micrometres for the optics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Cell radius (without protrusions) as a fraction of the crop's shorter side.
CENTRAL_RADIUS = (0.16, 0.24)
NEIGHBOUR_RADIUS = (0.14, 0.24)
MAX_NEIGHBOURS = 3
PLACEMENT_TRIES = 25
CELL_GAP_UM = 1.0  # free space kept between cells so that each is its own component in the mask
DEBRIS_PER_IMAGE = 3.0  # Poisson mean, cells and controls alike
DEBRIS_RADIUS_UM = (0.3, 2.0)
_TABLE_THETA = np.linspace(-np.pi, np.pi, 4097)


@dataclass(frozen=True)
class CellShape:
    """Radius as a function of angle: harmonics deform the disc, Gaussian bumps make protrusions."""

    radius: float
    harmonics: np.ndarray  # (K, 3): order, amplitude (relative), phase
    protrusions: np.ndarray  # (P, 3): angle, length (px), angular width (rad)

    def r(self, theta: np.ndarray) -> np.ndarray:
        out = np.ones_like(theta)
        for order, amp, phase in self.harmonics:
            out += amp * np.cos(order * theta + phase)
        out *= self.radius
        for angle, length, width in self.protrusions:
            delta = (theta - angle + np.pi) % (2 * np.pi) - np.pi
            out += length * np.exp(-0.5 * (delta / width) ** 2)
        return out

    def r_interp(self, theta: np.ndarray) -> np.ndarray:
        """``r`` looked up in a fine table: the shape is smooth at this step, and images are large."""
        return np.interp(theta, _TABLE_THETA, self.r(_TABLE_THETA)).astype(np.float32)

    @property
    def r_max(self) -> float:
        return float(self.r(_TABLE_THETA).max())

    def scaled(self, factor: float) -> CellShape:
        protrusions = self.protrusions.copy()
        protrusions[:, 1] *= factor
        return CellShape(self.radius * factor, self.harmonics, protrusions)


def random_shape(rng: np.random.Generator, radius: float) -> CellShape:
    orders = np.arange(2, 7, dtype=float)
    amps = rng.normal(0.0, 0.22 / orders)
    amps *= min(1.0, 0.35 / np.abs(amps).sum())  # keep the body convex-ish: radius stays >= 0.65 R
    harmonics = np.stack([orders, amps, rng.uniform(0, 2 * np.pi, orders.size)], axis=1)
    n = int(rng.integers(1, 5))
    protrusions = np.stack(
        [rng.uniform(-np.pi, np.pi, n), radius * rng.uniform(0.4, 1.3, n), rng.uniform(0.06, 0.18, n)], axis=1
    )
    return CellShape(radius, harmonics, protrusions)


@dataclass(frozen=True)
class Nucleus:
    dy: float  # centre relative to the cell centre (px)
    dx: float
    a: float  # semi-axes (px)
    b: float
    angle: float


def random_nucleus(rng: np.random.Generator, radius: float) -> Nucleus:
    offset, direction = radius * rng.uniform(0.0, 0.2), rng.uniform(-np.pi, np.pi)
    a = radius * rng.uniform(0.28, 0.4)
    return Nucleus(offset * np.sin(direction), offset * np.cos(direction), a, a * rng.uniform(0.7, 1.0),
                   rng.uniform(0, np.pi))


@dataclass
class Scene:
    """Per-pixel geometry of one subimage (all arrays (H, W))."""

    pixel_um: float
    labels: np.ndarray  # int32: 0 background, k = cell k (1 is the central cell)
    nucleus: np.ndarray  # bool
    nucleus_distance: np.ndarray  # float32: distance from the cell's own nucleus centre / cell radius
    debris: np.ndarray  # float32: sum of debris particles, each peaking at its own weight
    n_cells: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.labels.shape


def _window(cy: float, cx: float, reach: float, shape: tuple[int, int]) -> tuple[slice, slice] | None:
    h, w = shape
    y0, y1 = max(0, int(np.floor(cy - reach)) - 1), min(h, int(np.ceil(cy + reach)) + 2)
    x0, x1 = max(0, int(np.floor(cx - reach)) - 1), min(w, int(np.ceil(cx + reach)) + 2)
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _cell_pixels(shape: CellShape, cy: float, cx: float, image_shape: tuple[int, int]):
    """(window, inside mask, dy, dx) of a cell centred at (cy, cx); None when it misses the image."""
    window = _window(cy, cx, shape.r_max, image_shape)
    if window is None:
        return None
    dy = (np.arange(window[0].start, window[0].stop, dtype=np.float32) - cy)[:, None]
    dx = (np.arange(window[1].start, window[1].stop, dtype=np.float32) - cx)[None, :]
    inside = np.hypot(dy, dx) < shape.r_interp(np.arctan2(dy, dx))
    return window, inside, dy, dx


def _place_nucleus(scene: Scene, label: int, window, inside, dy, dx, radius: float, nucleus: Nucleus) -> None:
    ey, ex = dy - nucleus.dy, dx - nucleus.dx
    c, s = np.cos(nucleus.angle), np.sin(nucleus.angle)
    u, v = ex * c + ey * s, -ex * s + ey * c
    in_nucleus = inside & ((u / nucleus.a) ** 2 + (v / nucleus.b) ** 2 < 1.0)
    scene.labels[window][inside] = label
    scene.nucleus[window] |= in_nucleus
    scene.nucleus_distance[window][inside] = (np.hypot(ey, ex) / radius)[inside]


def _central_cell(rng: np.random.Generator, scene: Scene) -> None:
    h, w = scene.shape
    side = min(h, w)
    radius = side * rng.uniform(*CENTRAL_RADIUS)
    shape = random_shape(rng, radius)
    cy, cx = (h - 1) / 2 + side * rng.uniform(-0.04, 0.04), (w - 1) / 2 + side * rng.uniform(-0.04, 0.04)
    room = min(cy, cx, h - 1 - cy, w - 1 - cx) - 2.0  # the central cell stays whole, off the border
    if shape.r_max > room:
        shape = shape.scaled(room / shape.r_max)
    window, inside, dy, dx = _cell_pixels(shape, cy, cx, scene.shape)
    _place_nucleus(scene, 1, window, inside, dy, dx, shape.radius, random_nucleus(rng, shape.radius))


def _neighbour(rng: np.random.Generator, scene: Scene, label: int, gap: int) -> bool:
    """Try to add a cell that the border cuts and that keeps ``gap`` pixels from the others."""
    h, w = scene.shape
    side = min(h, w)
    for _ in range(PLACEMENT_TRIES):
        radius = side * rng.uniform(*NEIGHBOUR_RADIUS)
        shape = random_shape(rng, radius)
        edge = int(rng.integers(4))
        depth = radius * rng.uniform(-0.3, 0.5)  # centre's distance inside the border (negative: outside)
        along = rng.uniform(0, (w if edge < 2 else h) - 1)
        cy, cx = [(depth, along), (h - 1 - depth, along), (along, depth), (along, w - 1 - depth)][edge]
        cell = _cell_pixels(shape, cy, cx, scene.shape)
        if cell is None:
            continue
        window, inside, dy, dx = cell
        if inside.sum() < 0.05 * np.pi * radius**2:
            continue
        touches = inside[0].any() if window[0].start == 0 else False
        touches |= inside[-1].any() if window[0].stop == h else False
        touches |= inside[:, 0].any() if window[1].start == 0 else False
        touches |= inside[:, -1].any() if window[1].stop == w else False
        if not touches:
            continue
        grown = ndimage.binary_dilation(np.pad(inside, gap), iterations=gap)
        padded = np.pad(scene.labels, gap)
        region = padded[window[0].start : window[0].stop + 2 * gap, window[1].start : window[1].stop + 2 * gap]
        if (grown & (region > 0)).any():
            continue
        _place_nucleus(scene, label, window, inside, dy, dx, shape.radius, random_nucleus(rng, shape.radius))
        return True
    return False


def _debris(rng: np.random.Generator, shape: tuple[int, int], pixel_um: float) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    for _ in range(int(rng.poisson(DEBRIS_PER_IMAGE))):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        sigma = max(rng.uniform(*DEBRIS_RADIUS_UM) / pixel_um, 0.5)
        weight = rng.uniform(0.3, 1.0)
        window = _window(cy, cx, 4 * sigma, shape)
        if window is None:
            continue
        dy = (np.arange(window[0].start, window[0].stop) - cy)[:, None]
        dx = (np.arange(window[1].start, window[1].stop) - cx)[None, :]
        out[window] += (weight * np.exp(-0.5 * (dy**2 + dx**2) / sigma**2)).astype(np.float32)
    return out


def make_scene(rng: np.random.Generator, shape: tuple[int, int], pixel_um: float, with_cells: bool) -> Scene:
    """A subimage's geometry: a central cell plus cut neighbours (or none, for a control), and debris."""
    scene = Scene(
        pixel_um=pixel_um,
        labels=np.zeros(shape, np.int32),
        nucleus=np.zeros(shape, bool),
        nucleus_distance=np.full(shape, np.inf, np.float32),
        debris=np.zeros(shape, np.float32),
        n_cells=0,
    )
    if with_cells:
        _central_cell(rng, scene)
        n = 1
        gap = max(2, int(np.ceil(CELL_GAP_UM / pixel_um)))
        for _ in range(int(rng.integers(1, MAX_NEIGHBOURS + 1))):
            n += _neighbour(rng, scene, n + 1, gap)
        scene.n_cells = n
    scene.debris = _debris(rng, shape, pixel_um)
    return scene
