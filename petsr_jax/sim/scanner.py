"""A 2D PET acquisition and OSEM reconstruction, fast enough to simulate a whole cohort on a CPU.

The synthetic cohort (`petsr_jax.sim`) turns a true activity map into a scan that looks
reconstructed rather than blurred: line integrals with attenuation, Poisson counts, scatter and
randoms, and PSF-modelled OSEM, slice by slice (2D, as after Fourier rebinning).

Why it is built this way (a rotate-and-sum projector cost 16 s per 384² slice, i.e. 13 h for the
paper-size cohort; see `notes/pet-simulation-cost.md`):

- One sparse system matrix (`scipy.sparse`, CSR, float32) holds the whole projector. It is the same
  for every slice of every patient, so it is built once per geometry (cached) and applied to all
  slices of a patient at once as one sparse × dense product `A @ X` with `X` of shape
  `[pixels, slices]`: the matrix is read once per product for ~90 slices instead of ~90 times.
- The matrix is Joseph's ray-driven projector: each ray steps one pixel at a time along its major
  axis and linearly interpolates the two neighbouring pixels across it, so it has two non-zeros
  per pixel per angle and its weights are path lengths in mm (so the same matrix gives the
  attenuation line integrals of a μ-map in 1/mm).
- Attenuation, detector normalisation and the calibration to counts enter as per-bin
  multiplicative factors on the sinogram, scatter and randoms as a per-bin additive term: they
  never change the matrix, and OSEM uses them exactly as a scanner's corrections do.
- The resolution model (the scanner PSF) is an isotropic Gaussian. Blurring an image by an
  isotropic Gaussian blurs each of its projections by the same Gaussian along the radial axis, so
  PSF-OSEM applies it as a 1D blur of the subset's sinogram (about ten times fewer samples than
  the image block, and one axis instead of two). Acquisition data are blurred with a slightly
  wider PSF than the reconstruction models, as real PSF models under-correct.
- OSEM subsets are interleaved angles; each subset has its own CSR matrix and its transpose
  (also CSR), so forward and back projections both stream rows.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import scipy.ndimage as ndi
import scipy.sparse as sp

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclasses.dataclass(frozen=True)
class ScannerGeometry:
    """The 2D acquisition: a square image of `size`² pixels of `pixel_mm`, `n_angles` views over
    180°, and `size` radial bins of `pixel_mm` each (the detector sampling matches the image grid).
    """

    size: int
    pixel_mm: float
    n_angles: int

    @property
    def n_bins(self) -> int:
        return self.size

    @property
    def angles(self) -> np.ndarray:
        """View angles in radians, `pi * a / n_angles`."""
        return np.pi * np.arange(self.n_angles) / self.n_angles


def _joseph_entries(geometry: ScannerGeometry, theta: float):
    """Rows (bin), columns (flat pixel) and path-length weights of one view's rays.

    Pixel `(row i, col j)` sits at `x = (j - c) d`, `y = (c - i) d` with `c = (size - 1) / 2`;
    the ray of bin `k` is the line `x cos(theta) + y sin(theta) = (k - c) d`.
    """
    n, d = geometry.size, geometry.pixel_mm
    centre = (n - 1) / 2.0
    s = (np.arange(n) - centre) * d
    cos_t, sin_t = np.cos(theta), np.sin(theta)
    steps = (np.arange(n) - centre) * d
    if abs(cos_t) >= abs(sin_t):
        # Mostly vertical rays: one sample per image row, interpolated between two columns.
        y = -steps  # y of image row i
        x = (s[:, None] - y[None, :] * sin_t) / cos_t  # [bins, rows]
        frac_index = x / d + centre
        length = d / abs(cos_t)
        major = np.broadcast_to(np.arange(n)[None, :], frac_index.shape)
    else:
        x = steps  # x of image column j
        y = (s[:, None] - x[None, :] * cos_t) / sin_t  # [bins, cols]
        frac_index = centre - y / d
        length = d / abs(sin_t)
        major = np.broadcast_to(np.arange(n)[None, :], frac_index.shape)
    lower = np.floor(frac_index).astype(np.int64)
    upper_weight = (frac_index - lower).astype(np.float32)
    bins = np.broadcast_to(np.arange(n)[:, None], frac_index.shape)
    rows, cols, vals = [], [], []
    for minor, weight in ((lower, 1.0 - upper_weight), (lower + 1, upper_weight)):
        keep = (minor >= 0) & (minor < n) & (weight > 0)
        if abs(cos_t) >= abs(sin_t):
            pixel = major[keep] * n + minor[keep]
        else:
            pixel = minor[keep] * n + major[keep]
        rows.append(bins[keep])
        cols.append(pixel)
        vals.append(weight[keep] * length)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals).astype(np.float32)


@functools.lru_cache(maxsize=4)
def system_matrix(geometry: ScannerGeometry) -> sp.csr_matrix:
    """The sparse projector `A`: `[n_angles * n_bins, size * size]`, rows ordered (angle, bin).

    `A @ image.ravel()` is the sinogram of line integrals in (image units × mm). Built once per
    geometry and cached, since every slice of every patient shares it.
    """
    rows, cols, vals = [], [], []
    for a, theta in enumerate(geometry.angles):
        r, c, v = _joseph_entries(geometry, theta)
        rows.append(r + a * geometry.n_bins)
        cols.append(c)
        vals.append(v)
    shape = (geometry.n_angles * geometry.n_bins, geometry.size**2)
    matrix = sp.coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=shape
    ).tocsr()
    matrix.sum_duplicates()
    return matrix


@functools.lru_cache(maxsize=4)
def subset_matrices(geometry: ScannerGeometry, n_subsets: int):
    """Per OSEM subset: `(sinogram rows, A_s, A_s^T)`, subsets of interleaved angles.

    Interleaving (angle `a` in subset `a % n_subsets`) makes every subset cover the full 180°,
    which is what keeps ordered-subsets updates close to full EM updates.
    """
    matrix = system_matrix(geometry)
    n_bins = geometry.n_bins
    out = []
    for subset in range(n_subsets):
        angles = np.arange(subset, geometry.n_angles, n_subsets)
        rows = (angles[:, None] * n_bins + np.arange(n_bins)[None, :]).ravel()
        block = matrix[rows]
        out.append((rows, block, block.T.tocsr()))
    return tuple(out)


def to_columns(images: np.ndarray) -> np.ndarray:
    """`[slices, H, W]` → `[H * W, slices]` (C-contiguous), the layout sparse products stream."""
    n_slices = images.shape[0]
    return np.ascontiguousarray(images.reshape(n_slices, -1).T, dtype=np.float32)


def from_columns(columns: np.ndarray, size: int) -> np.ndarray:
    """Inverse of `to_columns`: `[H * W, slices]` → `[slices, H, W]`."""
    return np.ascontiguousarray(columns.T.reshape(-1, size, size))


def project(geometry: ScannerGeometry, images: np.ndarray) -> np.ndarray:
    """Sinograms `[slices, n_angles, n_bins]` of images `[slices, size, size]` (line integrals)."""
    columns = system_matrix(geometry) @ to_columns(images)
    return np.ascontiguousarray(columns.T.reshape(-1, geometry.n_angles, geometry.n_bins))


def blur_radial(sinogram: np.ndarray, n_bins: int, fwhm_mm: float, pixel_mm: float) -> np.ndarray:
    """Gaussian blur along the radial (bin) axis of a `[views * n_bins, slices]` sinogram block.

    Equal to projecting the image blurred by the same isotropic in-plane Gaussian.
    """
    if fwhm_mm <= 0:
        return sinogram
    sigma = fwhm_mm * FWHM_TO_SIGMA / pixel_mm
    views = sinogram.reshape(-1, n_bins, sinogram.shape[-1])
    return ndi.gaussian_filter1d(views, sigma, axis=1, mode="constant").reshape(sinogram.shape)


def fov_mask(size: int) -> np.ndarray:
    """Pixels inside the circle inscribed in the image: what every view sees."""
    centre = (size - 1) / 2.0
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre) ** 2 + (xx - centre) ** 2 <= (size / 2.0) ** 2


def osem(
    geometry: ScannerGeometry,
    counts: np.ndarray,
    multiplicative: np.ndarray,
    additive: np.ndarray,
    *,
    n_iterations: int,
    n_subsets: int,
    psf_fwhm_mm: float,
) -> np.ndarray:
    """PSF-modelled OSEM of a block of 2D sinograms.

    The data model per bin is `counts ~ Poisson(multiplicative * G_r A x + additive)`, with
    `G_r` the Gaussian resolution model as a radial blur of the projections. All sinogram
    arguments are `[n_angles * n_bins, slices]` (rows ordered as the system matrix); returns
    images `[slices, size, size]` in the units for which `multiplicative` converts line
    integrals to expected counts.
    """
    size, pixel_mm = geometry.size, geometry.pixel_mm
    n_slices = counts.shape[1]
    blur = functools.partial(
        blur_radial, n_bins=geometry.n_bins, fwhm_mm=psf_fwhm_mm, pixel_mm=pixel_mm
    )
    inside = fov_mask(size).reshape(-1, 1)
    # Per subset, once: its rows of the data and factors, and the sensitivity with the pixels
    # that are never updated (outside the field of view, or unseen) set to infinity, so that
    # dividing by it gives exactly the zero those pixels keep.
    subsets = []
    for rows, a, a_t in subset_matrices(geometry, n_subsets):
        factors = multiplicative[rows]
        sensitivity = a_t @ blur(factors)
        sensitivity[~((sensitivity > 1e-12) & inside)] = np.inf
        subsets.append((a, a_t, factors, additive[rows], counts[rows], sensitivity))
    image = np.where(inside, 1.0, 0.0).astype(np.float32) * np.ones((1, n_slices), np.float32)
    # Start at the mean activity the data imply, so the first updates are not spent on scale.
    total = counts.sum(0) - additive.sum(0)
    expected_per_unit = multiplicative.T @ (system_matrix(geometry) @ image[:, :1]).ravel()
    image *= np.maximum(total, 1.0) / np.maximum(expected_per_unit, 1e-12)
    for _ in range(n_iterations):
        for a, a_t, factors, additive_s, counts_s, sensitivity in subsets:
            expected = factors * blur(a @ image) + additive_s
            ratio = np.divide(counts_s, expected, out=np.zeros_like(expected), where=expected > 0)
            update = a_t @ blur(factors * ratio)
            image *= np.divide(update, sensitivity, out=update)
    return from_columns(image, size)
