"""Richardson–Lucy deconvolution of a scan by a Gaussian PSF: the classical baseline for
enhancement, measured with the same NEMA analysis as the networks.

    sharper = deconvolve(volume, fwhm_mm=4.3, iterations=10)          # isotropic PSF
    sharper = deconvolve(volume, fwhm_mm=(4.3, 5.0), iterations=10)   # in-plane, axial

Each iteration multiplies the estimate by the blurred-back ratio of the scan to the blurred
estimate, `x ← x · Hᵀ(y / H x)`, with H a 3D Gaussian blur (`scipy.ndimage.gaussian_filter`,
kernel normalised to sum 1, truncated at 4 sigma, PSF FWHM converted to voxels per axis from the
volume's spacing). The estimate starts from the scan itself and stays non-negative (negative
input voxels are set to 0 first: RL is defined for non-negative data).

Activity is kept: with the boundary mode "reflect" (half-sample symmetric) the blur matrix H is
symmetric and each of its rows and columns sums to 1, so every iteration keeps the total of the
input exactly (sum x_new = sum_i y_i · (H x)_i / (H x)_i), up to rounding; voxels where the
blurred estimate vanishes (no activity anywhere within the kernel's reach) stay 0.

Iterations are the regulariser: more sharpen more and amplify noise more (measure both with
`petsr_jax.evaluation.nema`). This is numpy/scipy on the CPU; a 192² × 89 scan takes about a
second per iteration.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from petsr_jax.volume import Volume

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
TRUNCATE = 4.0


class DeconvolutionError(ValueError):
    """A PSF or an iteration count that cannot be used; the message says which and why."""


def sigma_voxels(fwhm_mm, spacing) -> tuple[float, float, float]:
    """Gaussian sigma in voxels `(z, y, x)` of a PSF FWHM in mm: a number (isotropic) or
    `(in_plane, axial)`, for voxels of `spacing` `(z, y, x)` mm."""
    if np.ndim(fwhm_mm) == 0:
        in_plane = axial = float(fwhm_mm)
    else:
        values = [float(v) for v in fwhm_mm]
        if len(values) != 2:
            raise DeconvolutionError(
                f"PSF FWHM: give one number (isotropic) or two (in-plane, axial) mm, got {values}"
            )
        in_plane, axial = values
    for name, value in (("in-plane", in_plane), ("axial", axial)):
        if not (math.isfinite(value) and value >= 0):
            raise DeconvolutionError(f"PSF FWHM ({name}) must be 0 or more mm, got {value}")
    dz, dy, dx = (float(s) for s in spacing)
    return (
        axial / FWHM_PER_SIGMA / dz,
        in_plane / FWHM_PER_SIGMA / dy,
        in_plane / FWHM_PER_SIGMA / dx,
    )


def blur(image: np.ndarray, sigma) -> np.ndarray:
    """The PSF: a normalised Gaussian (`sigma` in voxels per axis), symmetric boundary."""
    return ndimage.gaussian_filter(image, sigma, mode="reflect", truncate=TRUNCATE)


def richardson_lucy(
    image: np.ndarray, sigma, iterations: int, *, start=None, progress=None
) -> np.ndarray:
    """`iterations` Richardson–Lucy updates of `image` (≥ 0) for a Gaussian PSF of `sigma`
    voxels per axis, in float64.

    `start` is the first estimate: None starts from the image itself; a number or an array
    (positive) starts from that. `progress(i)` is called after iteration i (1-based).
    """
    if int(iterations) != iterations or iterations < 0:
        raise DeconvolutionError(f"iterations must be a whole number ≥ 0, got {iterations}")
    observed = np.maximum(np.asarray(image, np.float64), 0.0)
    if start is None:
        estimate = observed.copy()
    else:
        estimate = np.broadcast_to(np.asarray(start, np.float64), observed.shape).copy()
    ratio = np.empty_like(observed)
    for i in range(int(iterations)):
        blurred = blur(estimate, sigma)
        ratio.fill(0.0)
        np.divide(observed, blurred, out=ratio, where=blurred > 0)
        estimate *= blur(ratio, sigma)
        if progress is not None:
            progress(i + 1)
    return estimate


def deconvolve(volume: Volume, fwhm_mm, iterations: int, *, progress=None) -> Volume:
    """`volume` deconvolved by a Gaussian PSF of `fwhm_mm` (one number, or `(in_plane,
    axial)`), `iterations` Richardson–Lucy updates; same units, geometry and headers.

    `meta["deconvolution"]` records the PSF, the iterations and the voxels set to 0 because
    they were negative in the input.
    """
    sigma = sigma_voxels(fwhm_mm, volume.spacing)
    negative = int(np.count_nonzero(volume.data < 0))
    result = richardson_lucy(volume.data, sigma, iterations, progress=progress)
    record = {
        "method": "Richardson-Lucy",
        "psf_fwhm_mm": fwhm_mm if np.ndim(fwhm_mm) == 0 else list(fwhm_mm),
        "psf_sigma_voxels": list(sigma),
        "iterations": int(iterations),
        "negative_input_voxels": negative,
    }
    return volume.replace(
        data=result.astype(np.float32), meta={**volume.meta, "deconvolution": record}
    )


def deconvolve_scan(input_path, output, *, psf_fwhm_mm, iterations, psf_fwhm_axial_mm=None) -> str:
    """Deconvolve the scan at `input_path` (DICOM series folder or NIfTI file) and write it to
    `output`: a NIfTI file when the name ends in .nii / .nii.gz, else a new DICOM series folder,
    in the input's units and geometry, complete or not at all (`io.write_outputs`). A bad PSF
    or iteration count and an existing output are refused before the scan is read. Returns a
    line saying what was written and how the total and maximum activity changed.
    """
    from petsr_jax import io, quantitation
    from petsr_jax.io.files import refuse_existing_target
    from petsr_jax.io.nifti import is_nifti

    output = Path(output)
    fwhm = psf_fwhm_mm if psf_fwhm_axial_mm is None else (psf_fwhm_mm, psf_fwhm_axial_mm)
    sigma_voxels(fwhm, (1.0, 1.0, 1.0))
    if int(iterations) != iterations or iterations < 1:
        raise DeconvolutionError(f"iterations must be a whole number ≥ 1, got {iterations}")
    refuse_existing_target(output, " (choose another output)")
    volume = io.read_volume(input_path)
    result = deconvolve(volume, fwhm, int(iterations))
    shown = "/".join(f"{v:g}" for v in np.atleast_1d(fwhm))
    description = f"RL {int(iterations)} it PSF {shown} mm"
    if is_nifti(output):
        io.write_outputs(result, nifti_path=output)
    else:
        io.write_outputs(result, dicom_dir=output, series_description=description)
    change = quantitation.activity_change(volume.data, result.data, units=volume.units)
    return f"wrote {output} ({description}); activity vs input: {change.summary()}"
