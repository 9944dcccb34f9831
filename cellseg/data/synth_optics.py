"""Imaging of a synthetic scene: what each channel of a layout records.

Fluorescence: a label's structure (cytoplasm fills the cell with a dimmer nucleus, membrane is a
bright rim, mitochondria are puncta and ER a network over part of the cell, a nuclear label fills
the nucleus) times a per-cell expression level (zero for cells that did not take up the label),
blurred by the PSF. Polarisation channels split a label's emission by a per-cell anisotropy ``a``:
parallel = total (1 + a) / 2, perpendicular = total (1 - a) / 2.
Brightfield: the cell is a weak phase object; by the transport-of-intensity equation a plane at
defocus z sees I = I0 (1 - z lambda / (2 pi) lap(phi)), blurred more the further from focus, so
the in-focus plane shows only the faint absorption.
Camera: Poisson photon noise (normal approximation for bright pixels), Gaussian read noise,
offset, uneven illumination, uint16.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cellseg.data.layouts import Channel
from cellseg.data.synth_scene import Scene

FLUORESCENCE_LABELS = ("cytoplasm", "membrane", "mitochondria", "er", "nucleus")

UNLABELLED_FRACTION = 0.2  # chance that a cell shows no signal for a given label
PSF_SIGMA_UM = 0.2
EDGE_RISE_UM = 1.0  # distance over which a cell reaches full thickness
MEMBRANE_WIDTH_UM = 0.4
LABEL_PHOTONS = (np.log(800.0), 0.3)  # log-normal: a stack's peak photons per label
EXPRESSION_SPREAD = 0.5  # log-normal sigma of per-cell expression
ANISOTROPY = (0.05, 0.4)
AUTOFLUORESCENCE_PHOTONS = (20.0, 60.0)
ORGANELLE_REACH = (0.6, 1.2)  # organelles fill the cell up to this distance from the nucleus (cell radii)
PHASE_RAD = (0.8, 1.6)  # a cell's optical path difference at full thickness
ABSORPTION = 0.03
WAVELENGTH_UM = 0.55
DEFOCUS_BLUR_PER_UM = 0.06  # added blur (um) per um of defocus
BRIGHTFIELD_PHOTONS = (1500.0, 3000.0)
CAMERA_OFFSET, READ_NOISE, GAIN = 100.0, 2.0, 1.0
EXACT_POISSON_BELOW = 30.0


def _illumination(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A smooth field (~0.75-1.15): vignetting centred off the crop plus a tilt."""
    h, w = shape
    y = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    x = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    y0, x0 = rng.uniform(-0.6, 0.6, 2)
    tilt_y, tilt_x = rng.uniform(-0.1, 0.1, 2)
    vignette = rng.uniform(0.05, 0.2)
    return (1.0 + tilt_y * y + tilt_x * x - vignette * ((y - y0) ** 2 + (x - x0) ** 2)).astype(np.float32)


def _band_noise(rng: np.random.Generator, shape, small_px: float, large_px: float) -> np.ndarray:
    """Band-pass Gaussian noise with unit standard deviation (structure between the two scales)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    band = ndimage.gaussian_filter(white, small_px) - ndimage.gaussian_filter(white, large_px)
    return band / max(float(band.std()), 1e-6)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class Optics:
    """Renders the channels of one scene; all randomness comes from the generator given."""

    def __init__(self, scene: Scene, rng: np.random.Generator):
        self.scene, self.rng = scene, rng
        self.px = scene.pixel_um
        self.cell = scene.labels > 0
        self.n = scene.n_cells
        edt = ndimage.distance_transform_edt(self.cell).astype(np.float32)
        self.edt_um = edt * self.px
        self.thickness = np.where(self.cell, 1.0 - np.exp(-self.edt_um / EDGE_RISE_UM), 0.0).astype(np.float32)
        self.nucleus_soft = ndimage.gaussian_filter(scene.nucleus.astype(np.float32), 0.5 / self.px)
        self.fluorescence_field = _illumination(rng, scene.shape)
        self.brightfield_field = _illumination(rng, scene.shape)
        self.autofluorescence = rng.uniform(*AUTOFLUORESCENCE_PHOTONS)
        # Mitochondria are there whether or not a channel labels them: they also scatter light.
        self.mitochondria = self._organelles(punctate=True)
        self._structures: dict[str, np.ndarray] = {"mitochondria": self.mitochondria}
        self._labels: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # --- structures -------------------------------------------------------------------------------
    def _per_cell(self, values: np.ndarray) -> np.ndarray:
        """Broadcast per-cell values (index 0 = background = 0) to pixels."""
        return np.concatenate([[0.0], values]).astype(np.float32)[self.scene.labels]

    def _organelles(self, punctate: bool) -> np.ndarray:
        reach = self._per_cell(self.rng.uniform(*ORGANELLE_REACH, self.n))
        region = np.clip((reach - self.scene.nucleus_distance) / 0.15, 0.0, 1.0) * (1.0 - self.nucleus_soft)
        region *= self.cell
        if punctate:  # mitochondria: puncta and short tubules ~0.5 um
            band = _band_noise(self.rng, self.scene.shape, 0.3 / self.px, 1.0 / self.px)
            return (_sigmoid((band - 1.0) / 0.2) * region).astype(np.float32)
        band = _band_noise(self.rng, self.scene.shape, 0.4 / self.px, 1.5 / self.px)  # ER: zero-crossing network
        envelope = 4.0 * self.nucleus_soft * (1.0 - self.nucleus_soft)
        return ((np.exp(-((band / 0.35) ** 2)) * region + 0.6 * envelope) * self.cell).astype(np.float32)

    def structure(self, label: str) -> np.ndarray:
        if label not in self._structures:
            if label == "cytoplasm":
                s = self.thickness * (1.0 - 0.65 * self.nucleus_soft)
            elif label == "membrane":
                s = np.exp(-(self.edt_um - self.px) / MEMBRANE_WIDTH_UM) * self.cell + 0.05 * self.thickness
            elif label == "er":
                s = self._organelles(punctate=False)
            else:  # nucleus: chromatin texture inside the nuclear envelope
                chromatin = _band_noise(self.rng, self.scene.shape, 0.3 / self.px, 1.5 / self.px)
                s = self.nucleus_soft * (0.75 + 0.25 * _sigmoid(chromatin))
            self._structures[label] = s.astype(np.float32)
        return self._structures[label]

    # --- fluorescence -----------------------------------------------------------------------------
    def _label_emission(self, label: str) -> tuple[np.ndarray, np.ndarray]:
        """(total, anisotropy-weighted) emitted photons of a label, blurred by the PSF."""
        if label not in self._labels:
            peak = np.exp(self.rng.normal(*LABEL_PHOTONS))
            expression = np.exp(self.rng.normal(0.0, EXPRESSION_SPREAD, self.n))
            expression *= self.rng.random(self.n) >= UNLABELLED_FRACTION
            anisotropy = self.rng.uniform(*ANISOTROPY, self.n)
            debris_glow = self.rng.uniform(0.2, 1.0) * peak
            total = peak * self._per_cell(expression) * self.structure(label) + debris_glow * self.scene.debris
            polarised = peak * self._per_cell(expression * anisotropy) * self.structure(label)
            sigma = PSF_SIGMA_UM / self.px
            self._labels[label] = (ndimage.gaussian_filter(total, sigma), ndimage.gaussian_filter(polarised, sigma))
        return self._labels[label]

    def fluorescence(self, label: str, polarisation: str) -> np.ndarray:
        total, polarised = self._label_emission(label)
        if polarisation == "total":
            signal, background = total, self.autofluorescence
        else:
            sign = 1.0 if polarisation == "parallel" else -1.0
            signal, background = 0.5 * (total + sign * polarised), 0.5 * self.autofluorescence
        return self._camera((signal + background) * self.fluorescence_field)

    # --- brightfield ------------------------------------------------------------------------------
    def _brightfield_planes(self) -> tuple[np.ndarray, np.ndarray]:
        """In-focus transmission and lap(phase) (rad / um^2), both at the PSF's blur.

        Defocus blur is Gaussian and linear, so a plane at z is these two blurred further.
        """
        if "transmission" not in self._structures:
            cell_phase = self._per_cell(self.rng.uniform(*PHASE_RAD, self.n))
            phase = cell_phase * (self.thickness + 0.35 * self.nucleus_soft * self.cell) + 0.4 * self.mitochondria
            phase += 0.8 * self.scene.debris
            absorption = ABSORPTION * self.thickness + 0.5 * self.scene.debris
            sigma = PSF_SIGMA_UM / self.px
            self._structures["transmission"] = ndimage.gaussian_filter(1.0 - absorption, sigma)
            self._structures["phase_laplacian"] = ndimage.gaussian_laplace(phase, sigma) / self.px**2
            self.brightfield_photons = self.rng.uniform(*BRIGHTFIELD_PHOTONS)
        return self._structures["transmission"], self._structures["phase_laplacian"]

    def brightfield(self, z_um: float) -> np.ndarray:
        transmission, laplacian = self._brightfield_planes()
        contrast = transmission - z_um * WAVELENGTH_UM / (2 * np.pi) * laplacian  # transport of intensity
        if z_um != 0:
            contrast = ndimage.gaussian_filter(contrast, DEFOCUS_BLUR_PER_UM * abs(z_um) / self.px)
        photons = self.brightfield_photons * self.brightfield_field * np.clip(contrast, 0.0, None)
        return self._camera(photons)

    # --- camera -----------------------------------------------------------------------------------
    def _camera(self, photons: np.ndarray) -> np.ndarray:
        """Shot noise, gain, offset and read noise.

        Shot noise is drawn exactly (Poisson) below ``EXACT_POISSON_BELOW`` photons and from the
        normal approximation N(n, n) above it, where Poisson's remaining skewness (1 / sqrt(n) < 0.2)
        is negligible; exact sampling of every pixel would dominate the run time.
        """
        photons = np.clip(photons, 0.0, None, dtype=np.float32)
        electrons = photons + np.sqrt(photons) * self.rng.standard_normal(photons.shape, np.float32)
        dim = photons < EXACT_POISSON_BELOW
        electrons[dim] = self.rng.poisson(photons[dim])
        counts = GAIN * electrons + CAMERA_OFFSET + READ_NOISE * self.rng.standard_normal(photons.shape, np.float32)
        return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)

    def channel(self, channel: Channel) -> np.ndarray:
        if channel.kind == "brightfield":
            return self.brightfield(float(channel.z_um))
        return self.fluorescence(channel.label, channel.polarisation or "total")
