"""Imaging of a synthetic scene: what each channel of a layout records.

Fluorescence: a label's structure (cytoplasm fills the cell with a dimmer nucleus; membrane is a
bright rim over the top and bottom membranes seen face on; mitochondria are puncta and ER a network
over part of the cell; a nuclear label fills the nucleus) times a per-cell expression level (zero
for cells that did not take up the label), blurred by the PSF. Polarisation channels split a
label's emission by a per-cell anisotropy ``a``: parallel = total (1 + a) / 2, perpendicular =
total (1 - a) / 2.
Brightfield: the cell is a nearly transparent weak object (phase of its thickness, nucleus and
organelles; faint absorption), imaged with the linear contrast transfer of a defocused microscope
under partially coherent illumination (see ``Optics.brightfield``): faint interiors, thin halos at
the edges that swap sign through focus and soften far from it, almost nothing in focus.
Camera: Poisson photon noise (normal approximation for bright pixels), Gaussian read noise,
offset, uneven illumination, uint16.

Calibration against the paper's own planes (Figure 1c of Cameron et al. 2021, the seed's
``images/dataloader.png``: ten 197 x 236 px tiles at y 2060-2296; mask = the largest Otsu component
of the cytoplasm tile's red channel, holes filled), with ``cellseg data qc``'s statistics
(``cellseg/data/qc.py``; reproduced by tests/test_qc.py), as ``PAPER_PLANES``. The brightfield
model's constants were set so that the synthetic trainer stacks at 96 px (12 cell stacks) land in
the same regime — interior 0.007-0.046, edge 0.123-0.150 off focus and 0.036 in focus, Otsu Dice
0.39-0.56, nothing clipped — while cytoplasm stays thresholdable (Otsu 0.87, membrane 0.64, dim
perinuclear mitochondria 0.39).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cellseg.data.layouts import Channel
from cellseg.data.synth_scene import Scene

FLUORESCENCE_LABELS = ("cytoplasm", "membrane", "mitochondria", "er", "nucleus")

# The paper's planes measured as the module docstring says: (interior contrast, edge contrast, Otsu Dice).
PAPER_PLANES = {
    "cytoplasm": (7.793, 5.300, 0.910),
    "membrane": (3.699, 4.808, 0.679),
    "mitochondria": (3.568, 1.904, 0.310),
    "brightfield -10 um": (0.054, 0.168, 0.197),
    "brightfield -5 um": (0.041, 0.158, 0.194),
    "brightfield -3 um": (0.040, 0.128, 0.197),
    "brightfield 0 um": (0.023, 0.079, 0.206),
    "brightfield +3 um": (0.012, 0.181, 0.198),
    "brightfield +5 um": (0.001, 0.192, 0.197),
    "brightfield +10 um": (0.010, 0.165, 0.227),
}

UNLABELLED_FRACTION = 0.2  # chance that a cell shows no signal for a given label
PSF_SIGMA_UM = 0.2
EDGE_RISE_UM = 1.0  # distance over which a cell reaches full thickness
MEMBRANE_WIDTH_UM = 0.4
MEMBRANE_FACE_ON = 0.3  # widefield sees the top and bottom membranes face on, across the whole cell
LABEL_PHOTONS = (np.log(800.0), 0.3)  # log-normal: a stack's peak photons per label
LABEL_BRIGHTNESS = {"mitochondria": 0.4}  # dimmer than the others, as in the paper's panel (1 otherwise)
EXPRESSION_SPREAD = 0.5  # log-normal sigma of per-cell expression
ANISOTROPY = (0.05, 0.4)
AUTOFLUORESCENCE_PHOTONS = (20.0, 60.0)
ORGANELLE_REACH = (0.4, 0.9)  # organelles gather around the nucleus, up to this distance (cell radii): not the thin periphery
PHASE_RAD = (1.2, 2.4)  # a cell's optical path difference at full thickness
ABSORPTION = 0.01
WAVELENGTH_UM = 0.55
CONDENSER_NA = 0.12  # spread of illumination angles: the higher, the faster defocus washes detail out
BRIGHTFIELD_PAD_UM = 8.0
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
                s = np.exp(-(self.edt_um - self.px) / MEMBRANE_WIDTH_UM) * self.cell + MEMBRANE_FACE_ON * self.thickness
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
            peak = np.exp(self.rng.normal(*LABEL_PHOTONS)) * LABEL_BRIGHTNESS.get(label, 1.0)
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
    def _object_spectra(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Fourier transforms of the absorption and phase maps, mirror-padded so the crop's borders
        do not wrap around; and the pad width."""
        if "phase_spectrum" not in self._structures:
            cell_phase = self._per_cell(self.rng.uniform(*PHASE_RAD, self.n))
            phase = cell_phase * (self.thickness + 0.35 * self.nucleus_soft * self.cell) + 0.4 * self.mitochondria
            phase += 0.8 * self.scene.debris
            absorption = ABSORPTION * self.thickness + 0.5 * self.scene.debris
            pad = int(np.ceil(BRIGHTFIELD_PAD_UM / self.px))
            self._structures["phase_spectrum"] = np.fft.rfft2(np.pad(phase, pad, mode="reflect"))
            self._structures["absorption_spectrum"] = np.fft.rfft2(np.pad(absorption, pad, mode="reflect"))
            self.brightfield_photons = self.rng.uniform(*BRIGHTFIELD_PHOTONS)
            self.brightfield_pad = pad
        return self._structures["absorption_spectrum"], self._structures["phase_spectrum"], self.brightfield_pad

    def brightfield(self, z_um: float) -> np.ndarray:
        """A weak object imaged at defocus z under partially coherent illumination (linear contrast).

        Contrast(k) = -2 A(k) cos(chi) E(k) + 2 Phi(k) sin(chi) E(k), chi = pi lambda z |k|^2: phase
        shows only out of focus, with the sign of z (halos swap from dark to bright through focus);
        E = objective blur x condenser envelope exp(-(pi NA_c z |k|)^2): the illumination's spread
        of angles washes fine detail out the further from focus, so far planes keep only soft halos
        at the cell's edge, never a filled silhouette; nothing is clipped.
        """
        absorption, phase, pad = self._object_spectra()
        padded = (self.scene.shape[0] + 2 * pad, self.scene.shape[1] + 2 * pad)
        ky = np.fft.fftfreq(padded[0], d=self.px)[:, None]
        kx = np.fft.rfftfreq(padded[1], d=self.px)[None, :]
        k2 = (ky**2 + kx**2).astype(np.float32)
        chi = np.pi * WAVELENGTH_UM * z_um * k2
        envelope = np.exp(-2 * (np.pi * PSF_SIGMA_UM) ** 2 * k2 - (np.pi * CONDENSER_NA * z_um) ** 2 * k2)
        spectrum = (-2 * absorption * np.cos(chi) + 2 * phase * np.sin(chi)) * envelope
        contrast = np.fft.irfft2(spectrum, s=padded)[pad:pad + self.scene.shape[0], pad:pad + self.scene.shape[1]]
        return self._camera(self.brightfield_photons * self.brightfield_field * (1.0 + contrast.astype(np.float32)))

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
