"""NEMA NU 2 image-quality phantom analysis: sphere resolution and recovery, background noise.

The measuring instrument for enhancement of real scans: PET physicists judge a scanner, a
reconstruction or a post-processing by how it renders the NEMA IQ phantom, and so do we.

    result = analyse(volume)                       # a Volume of a NEMA IQ phantom scan
    result["spheres"][0]["fwhm_mm"], result["spheres"][0]["rc_a50"], result["background"]["cov"]
    after = analyse(enhanced, true_activity=result["true_activity"])
    compare(result, after)                          # FWHM ratio, RC_A50 before/after, CoV ratio...
    write_report(out_dir, result, after=after)      # nema.json, nema.md, nema.png

How the phantom is found, with no coordinates typed in (scans differ in orientation, voxel size
and slice count):

1. The warm background level is the mode of the smoothed scan's histogram; the body is where
   the scan exceeds half of it (each slice's holes filled, so the lung insert is inside).
2. The sphere plane is the slice whose smoothed voxels rise most above that slice's own
   background (median plus four noise deviations): the spheres' equators lie in one plane.
3. The ring is the best match of the six-sphere pattern (NEMA NU 2: inner diameters 37, 28,
   22, 17, 13, 10 mm, centres 57.2 mm from the lung insert's axis, 60° apart in order of size)
   to that slice, over its centre, its rotation and its handedness (a mirrored scan), by FFT
   cross-correlation.
4. Each sphere is fitted in 3D to the voxels around it (`least_squares`; free: centre, sphere
   activity, background, Gaussian sigma), with the model of a hot sphere of the known radius in
   a cold 1.5 mm glass wall in warm background, blurred by an isotropic Gaussian and read at the
   voxel centres (`sphere_profile`, the closed form of a Gaussian-blurred ball). Voxels near
   another sphere, the lung insert or the body's edge are left out. The fitted FWHM is the
   image's resolution at its voxel centres, as pynemaiqpet and NEMA point-source measurements
   report it (no voxel-size correction).

Per sphere, with its fitted centre: RC_max (hottest voxel whose centre is in the sphere),
RC_mean (mean of those voxels), RC_A50 (mean of the voxels 26-connected to the hottest one at
or above B + 0.5 (max − B), B the background mean), each over the true sphere activity: given, or
the fitted plateau of the 37 mm sphere. Background: mean and voxel CoV of the voxels within
20 mm of the sphere plane, 15 mm or more from the body's edge, any sphere's wall and the lung
insert; and NEMA NU 2's background variability (12 ROIs of each sphere size on 5 slices, sphere
plane ± 10 and ± 20 mm) and lung residual. RCs are checked against the EARL bands below.

Bad input (not a NEMA phantom, spheres not found, spheres cut by the field of view) raises
`NemaError` with one line naming what was not found.
"""

from __future__ import annotations

import io as _io
import json
import math
import shutil
from pathlib import Path

import numpy as np
from scipy import fft, ndimage, optimize, special

from petsr_jax.io.files import (
    Staged,
    commit,
    refuse_existing_target,
    remove_quietly,
    temporary_name,
)
from petsr_jax.volume import Volume

# NEMA NU 2 IQ phantom: sphere inner diameters in ring order (largest first), ring, insert.
DIAMETERS_MM = (37.0, 28.0, 22.0, 17.0, 13.0, 10.0)
RING_RADIUS_MM = 57.2
WALL_MM = 1.5
LUNG_DIAMETER_MM = 51.0

# EARL accreditation bands (low, high) per sphere, largest first. EARL1: Boellaard et al., "FDG
# PET/CT: EANM procedure guidelines for tumour imaging: version 2.0", Eur J Nucl Med Mol Imaging
# 42:328-354 (2015), Table 6; EARL2: Kaalep et al., "Feasibility of state of the art PET/CT
# systems performance harmonisation", Eur J Nucl Med Mol Imaging 45:1344-1361 (2018). RCs are
# against the calibrated true sphere activity; a fitted plateau only stands in for it.
_EARL_TABLE = """
program statistic bound  37 mm 28 mm 22 mm 17 mm 13 mm 10 mm
EARL1   rc_a50    low    0.76  0.72  0.63  0.57  0.44  0.27
EARL1   rc_a50    high   0.89  0.85  0.78  0.73  0.60  0.43
EARL1   rc_max    low    0.95  0.91  0.83  0.73  0.59  0.34
EARL1   rc_max    high   1.16  1.13  1.09  1.01  0.85  0.57
EARL2   rc_a50    low    0.85  0.82  0.80  0.76  0.63  0.39
EARL2   rc_a50    high   1.00  0.97  0.99  0.97  0.86  0.61
EARL2   rc_max    low    1.05  1.01  1.01  1.00  0.85  0.52
EARL2   rc_max    high   1.29  1.26  1.32  1.38  1.22  0.88
"""


def _earl_bands(table: str) -> dict[str, dict[str, tuple[tuple[float, ...], tuple[float, ...]]]]:
    """`{program: {statistic: (low per sphere, high per sphere)}}` from the table above."""
    bands: dict = {}
    for line in table.strip().splitlines()[1:]:
        program, statistic, bound, *values = line.split()
        pair = bands.setdefault(program, {}).setdefault(statistic, [None, None])
        pair[0 if bound == "low" else 1] = tuple(float(v) for v in values)
    return {p: {k: tuple(v) for k, v in stats.items()} for p, stats in bands.items()}


EARL_BANDS = _earl_bands(_EARL_TABLE)

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
# Smoothing of the copy used to find things (never of the voxels that are measured).
_DETECT_SIGMA_MM = 2.0
# Voxels fitted around a sphere: out to its wall plus this much background.
_FIT_MARGIN_MM = 12.0
# Voxels this close to another sphere's wall, the lung insert or the body's edge are not fitted.
_FIT_CLEARANCE_MM = 8.0
# NEMA NU 2: background ROIs 15 mm from the phantom's edge and from any sphere.
_BACKGROUND_CLEARANCE_MM = 15.0
_BACKGROUND_HALF_HEIGHT_MM = 20.0
_BV_OFFSETS_MM = (-20.0, -10.0, 0.0, 10.0, 20.0)
_BV_ROIS_PER_SLICE = 12
_LUNG_ROI_DIAMETER_MM = 30.0
# A sphere is found when its smoothed peak stands this many deviations of the smoothed
# background above the background and its fitted centre is close to where the ring puts it.
# The largest must also lift the mean of a cube of its radius's side, centred where the ring
# puts it, by many deviations of such means over the background: a real scan's 37 mm sphere
# does by 240 to 280, the ring's best match to pure noise by at most 4.
_FOUND_SIGMAS = 3.0
_FOUND_SIGMAS_LARGEST = 10.0
_FOUND_DISTANCE_MM = 8.0
_SIGMA_BOUNDS_MM = (0.05, 15.0)
FILES = ("nema.json", "nema.md", "nema.png")


class NemaError(ValueError):
    """The scan cannot be analysed as a NEMA IQ phantom; the message says what was not found."""


# ---------------------------------------------------------------------------------------------
# The model


def blurred_ball(r, radius: float, sigma: float) -> np.ndarray:
    """A ball of `radius` (value 1 inside) blurred by an isotropic 3D Gaussian of `sigma`, at
    distance `r` from its centre (closed form; r → 0 by its limit)."""
    r = np.asarray(r, np.float64)
    sigma = max(float(sigma), 1e-9)
    s2 = math.sqrt(2.0) * sigma
    safe = np.maximum(r, 1e-9)
    far = 0.5 * (special.erf((radius - safe) / s2) + special.erf((radius + safe) / s2)) - (
        sigma / (safe * math.sqrt(2.0 * math.pi))
    ) * (np.exp(-((safe - radius) ** 2) / s2**2) - np.exp(-((safe + radius) ** 2) / s2**2))
    centre = special.erf(radius / s2) - math.sqrt(2.0 / math.pi) * (radius / sigma) * math.exp(
        -(radius**2) / s2**2
    )
    return np.where(r < 1e-6 * max(sigma, radius), centre, far)


def sphere_profile(r, radius, sigma, activity, background, wall_mm: float = WALL_MM):
    """A hot sphere of `radius` and `activity` in a cold wall of `wall_mm`, in warm
    `background`, blurred by a Gaussian of `sigma`, at distance `r` from its centre."""
    return activity * blurred_ball(r, radius, sigma) + background * (
        1.0 - blurred_ball(r, radius + wall_mm, sigma)
    )


# ---------------------------------------------------------------------------------------------
# The analysis


def analyse(volume: Volume, true_activity: float | None = None, *, wall_mm: float = WALL_MM):
    """Measure a NEMA IQ phantom scan; see the module docstring. Returns a JSON-ready dict.

    Keys: `spheres` (largest first: `diameter_mm`, `fwhm_mm`, `rc_max`, `rc_mean`, `rc_a50`,
    `centre_voxel` `(z, y, x)`, `centre_mm` (the volume's patient space), fitted activity and
    background, EARL flags, a binned radial `profile`), `background` (`mean`, `cov`, `std`,
    `voxels`, `variability_percent`, `lung_residual_percent`), `true_activity` and its
    `true_activity_source`, `units`, `total_activity` (voxel sum × voxel volume, units·mL),
    `sphere_plane_slice`, `ring`.

    Raises:
      NemaError: no warm phantom body, no hot spheres, a sphere not found, or a sphere cut by
        the field of view.
    """
    data = np.asarray(volume.data, np.float64)
    spacing = np.asarray(volume.spacing, np.float64)
    if data.ndim != 3 or min(data.shape) < 3:
        raise NemaError(f"a NEMA phantom scan needs a 3D volume, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise NemaError("the scan holds NaN or infinite values")
    if true_activity is not None and not float(true_activity) > 0:
        raise NemaError(f"the true sphere activity must be positive, got {true_activity:g}")
    smooth = ndimage.gaussian_filter(data, _DETECT_SIGMA_MM / spacing)
    body = _body_mask(smooth, _background_level(smooth))
    plane = _sphere_plane(smooth, body)
    ring = _match_ring(smooth[plane], body[plane], spacing[1:])
    radii = np.array(DIAMETERS_MM) / 2
    starts = _ring_centres(ring, plane * spacing[0])
    axis = np.array(ring["centre_mm"])
    inside = _distance_inside(body, spacing)
    rough = _background_mask(data.shape, spacing, starts, radii, axis, inside, wall_mm)
    if rough.sum() < 100:
        raise NemaError(
            "no background region found away from the spheres, lung insert and body edge; "
            "the phantom body is too small or cut by the field of view"
        )
    # From here on, the background's level and the noise of the smoothed copy.
    noise_sd = float(np.std(smooth[rough]))
    level = float(np.mean(data[rough]))

    def found(centre, radius) -> bool:
        return _peak(smooth, spacing, centre, radius) - level >= _FOUND_SIGMAS * noise_sd

    def stands_out(centre, radius) -> bool:
        size = [max(1, int(round(radius / s))) for s in spacing]
        means = ndimage.uniform_filter(data, size, mode="nearest")
        voxel = np.round(np.asarray(centre) / spacing).astype(int)
        if np.any(voxel < 0) or np.any(voxel >= data.shape):
            return False
        spread = float(np.std(means[rough]))
        return means[tuple(voxel)] - level >= _FOUND_SIGMAS_LARGEST * spread

    # Found first, then whole: a scan without spheres must not be told they are cut. A sphere
    # that is not found is cut when the field of view cuts it and the largest one is found.
    cut = [
        _cut(d / 2 + wall_mm, c, data.shape, spacing, d)
        for d, c in zip(DIAMETERS_MM, starts, strict=True)
    ]
    missing = [d for d, c, r in zip(DIAMETERS_MM, starts, radii, strict=True) if not found(c, r)]
    if DIAMETERS_MM[0] not in missing and not stands_out(starts[0], radii[0]):
        missing.insert(0, DIAMETERS_MM[0])
    if (
        missing
        and DIAMETERS_MM[0] not in missing
        and all(cut[DIAMETERS_MM.index(d)] for d in missing)
    ):
        raise cut[DIAMETERS_MM.index(missing[0])]
    if missing:
        raise _not_found(missing, plane)
    for error in cut:
        if error is not None:
            raise error

    fits = []
    for i, diameter in enumerate(DIAMETERS_MM):
        others = [(starts[j], radii[j]) for j in range(len(radii)) if j != i]
        fit = _fit_sphere(data, spacing, starts[i], radii[i], level, inside, axis, others, wall_mm)
        moved = float(np.linalg.norm(fit["centre"] - starts[i]))
        if not found(fit["centre"], radii[i]) or moved > radii[i] + _FOUND_DISTANCE_MM:
            missing.append(diameter)
        fits.append(fit)
    if missing:
        raise _not_found(missing, plane)
    centres = [fit["centre"] for fit in fits]
    region = _background_mask(data.shape, spacing, centres, radii, axis, inside, wall_mm)
    values = data[region]
    bg_mean = float(values.mean())
    background = {
        "mean": bg_mean,
        "cov": _ratio(values.std(), bg_mean) if bg_mean > 0 else None,
        "std": float(values.std()),
        "voxels": int(values.size),
        **_background_variability(data, spacing, centres, radii, axis, inside, wall_mm),
    }

    if true_activity is None:
        truth, source = float(fits[0]["activity"]), "fitted plateau of the 37 mm sphere"
    else:
        truth, source = float(true_activity), "given"
    if not truth > 0:
        raise NemaError(f"the 37 mm sphere's fitted activity {truth:g} is not positive")
    spheres = [
        _sphere_record(volume, data, spacing, fit, radius, diameter, bg_mean, truth, wall_mm, i)
        for i, (fit, radius, diameter) in enumerate(zip(fits, radii, DIAMETERS_MM, strict=True))
    ]
    ring_centre = [plane * spacing[0], *axis]
    return {
        "spheres": spheres,
        "background": background,
        "true_activity": truth,
        "true_activity_source": source,
        "units": volume.units,
        "total_activity": float(data.sum() * np.prod(spacing) / 1000.0),
        "total_activity_units": f"{volume.units}·mL",
        "sphere_plane_slice": int(plane),
        "ring": {
            "centre_voxel": (np.array(ring_centre) / spacing).tolist(),
            "rotation_deg": ring["rotation_deg"],
            "mirrored": ring["mirrored"],
        },
        "spacing_mm": spacing.tolist(),
        "shape": list(data.shape),
    }


def _background_level(smooth: np.ndarray) -> float:
    """The warm background's level: the mode of the histogram of the body's voxels."""
    top = float(np.percentile(smooth, 99.9))
    if not top > 0:
        raise NemaError("the scan holds no activity (its voxels are all zero or negative)")
    values = smooth[smooth > 0.05 * top]
    hist, edges = np.histogram(values, bins=200, range=(0.0, float(np.percentile(values, 99))))
    hist = ndimage.gaussian_filter1d(hist.astype(np.float64), 2.0)
    peak = int(np.argmax(hist))
    return float(0.5 * (edges[peak] + edges[peak + 1]))


def _body_mask(smooth: np.ndarray, level: float) -> np.ndarray:
    """The phantom body: the largest connected warm region, each slice's holes filled."""
    warm = smooth > 0.5 * level
    filled = np.stack([ndimage.binary_fill_holes(s) for s in warm])
    labels, count = ndimage.label(filled)
    if count == 0:
        raise NemaError("no warm phantom body found in the scan")
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def _sphere_plane(smooth: np.ndarray, body: np.ndarray) -> int:
    """The slice whose voxels rise most above that slice's own background (median + 4 robust
    noise deviations): the spheres' equators. Slices with less than half the largest body area
    (the phantom's ends) are not considered."""
    area = body.reshape(len(body), -1).sum(axis=1)
    scores = np.zeros(len(body))
    for k in np.flatnonzero(area >= 0.5 * area.max()):
        values = smooth[k][body[k]]
        median = np.median(values)
        spread = 1.4826 * np.median(np.abs(values - median))
        scores[k] = np.maximum(values - (median + 4.0 * spread), 0.0).sum()
    if not scores.max() > 0:
        raise NemaError("no hot spheres found: no slice holds structures above its background")
    return int(np.argmax(scores))


def _ring_template(theta: float, side: float, spacing_yx: np.ndarray) -> np.ndarray:
    """The six spheres' equators (value 1 inside, partial at edges) around the template's
    centre pixel, sphere i at angle theta + side · i · 60° (0: towards +col, 90°: +row)."""
    reach = RING_RADIUS_MM + max(DIAMETERS_MM) / 2 + 2 * spacing_yx.max()
    half = np.ceil(reach / spacing_yx).astype(int)
    y = (np.arange(-half[0], half[0] + 1) * spacing_yx[0])[:, None]
    x = (np.arange(-half[1], half[1] + 1) * spacing_yx[1])[None, :]
    h = float(spacing_yx.mean())
    template = np.zeros((2 * half[0] + 1, 2 * half[1] + 1))
    for i, diameter in enumerate(DIAMETERS_MM):
        phi = theta + side * math.radians(60.0 * i)
        cy, cx = RING_RADIUS_MM * math.sin(phi), RING_RADIUS_MM * math.cos(phi)
        template += np.clip(0.5 + (diameter / 2 - np.hypot(y - cy, x - cx)) / h, 0.0, 1.0)
    return template


def _match_ring(slice_: np.ndarray, body: np.ndarray, spacing_yx: np.ndarray) -> dict:
    """Centre (grid mm), rotation and handedness of the sphere ring in the sphere plane."""
    values = slice_[body]
    if values.size == 0:
        raise NemaError("no phantom body in the slice of the hot spheres")
    median = float(np.median(values))
    excess = np.where(body, np.maximum(slice_ - median, 0.0), 0.0)
    template_shape = _ring_template(0.0, 1.0, spacing_yx).shape
    size = [fft.next_fast_len(s + t) for s, t in zip(excess.shape, template_shape, strict=True)]
    spectrum = fft.rfft2(excess, size)
    half = np.array(template_shape) // 2

    def score(theta, side):
        template = _ring_template(theta, side, spacing_yx)
        correlation = fft.irfft2(spectrum * np.conj(fft.rfft2(template, size)), size)
        index = np.unravel_index(int(np.argmax(correlation)), correlation.shape)
        # Index i is the lag of the template's corner, negative ones wrapped to the end; the
        # ring's centre is half a template further.
        lag = [
            (i if i <= size[k] - template_shape[k] else i - size[k]) + half[k]
            for k, i in enumerate(index)
        ]
        return float(correlation[index]), lag

    best = (-np.inf, None, 0.0, 1.0)
    for side in (1.0, -1.0):
        for degrees in range(0, 360, 5):
            value, lag = score(math.radians(degrees), side)
            if value > best[0]:
                best = (value, lag, float(degrees), side)
    _, _, coarse, side = best
    for degrees in np.arange(coarse - 4.0, coarse + 4.5, 1.0):
        value, lag = score(math.radians(degrees), side)
        if value > best[0]:
            best = (value, lag, float(degrees), side)
    value, lag, degrees, side = best
    return {
        "centre_mm": [lag[0] * spacing_yx[0], lag[1] * spacing_yx[1]],
        "rotation_deg": float(degrees % 360.0),
        "mirrored": bool(side < 0),
        "theta": math.radians(degrees),
        "side": side,
    }


def _ring_centres(ring: dict, z_mm: float) -> list[np.ndarray]:
    """Each sphere's centre (grid mm, z y x) where the matched ring puts it."""
    cy, cx = ring["centre_mm"]
    centres = []
    for i in range(len(DIAMETERS_MM)):
        phi = ring["theta"] + ring["side"] * math.radians(60.0 * i)
        centres.append(
            np.array(
                [z_mm, cy + RING_RADIUS_MM * math.sin(phi), cx + RING_RADIUS_MM * math.cos(phi)]
            )
        )
    return centres


def _not_found(diameters, plane: int) -> NemaError:
    names = ", ".join(f"{d:g} mm" for d in diameters)
    return NemaError(
        f"sphere(s) {names} not found on the ring of hot spheres in slice {plane} (no peak "
        "above the background noise where the NEMA pattern puts it); is this a NEMA IQ "
        "phantom scan with hot spheres?"
    )


def _cut(reach: float, centre, shape, spacing, diameter) -> NemaError | None:
    """The error for a sphere (with its wall) not whole inside the field of view, or None."""
    names = ("first slice", "last slice", "first row", "last row", "first column", "last column")
    for k in range(3):
        low = -0.5 * spacing[k]
        high = (shape[k] - 0.5) * spacing[k]
        for edge, past in ((0, centre[k] - reach < low), (1, centre[k] + reach > high)):
            if past:
                return NemaError(
                    f"the {diameter:g} mm sphere is cut by the field of view (it reaches past "
                    f"the {names[2 * k + edge]}, centre at voxel "
                    f"{', '.join(f'{c:.1f}' for c in np.asarray(centre) / spacing)}); the "
                    "analysis needs all six spheres whole in the scan"
                )
    return None


def _distance_inside(body: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance (mm) from each voxel inside the body to the body's edge (0 outside).

    The field of view's sides count as an edge (a body cut there has a blurred edge just
    outside); its first and last slices do not (a phantom often runs past the axial FOV).
    """
    padded = np.pad(body, ((0, 0), (1, 1), (1, 1)))
    return ndimage.distance_transform_edt(padded, sampling=spacing)[:, 1:-1, 1:-1]


def _grid(shape, spacing, box=None):
    """Grid-mm coordinates (z, y, x) of the voxels of `box` (slices), broadcastable."""
    box = box or tuple(slice(0, n) for n in shape)
    return [
        (np.arange(box[k].start, box[k].stop) * spacing[k]).reshape(
            [-1 if j == k else 1 for j in range(3)]
        )
        for k in range(3)
    ]


def _axis_distance(y, x, axis) -> np.ndarray:
    return np.hypot(y - axis[0], x - axis[1])


def _background_mask(shape, spacing, centres, radii, axis, inside, wall_mm) -> np.ndarray:
    """Background voxels: within 20 mm of the sphere plane, 15 mm or more from the body's edge,
    any sphere's wall and the lung insert."""
    z, y, x = _grid(shape, spacing)
    plane_z = float(np.mean([c[0] for c in centres]))
    clear = _BACKGROUND_CLEARANCE_MM
    mask = (np.abs(z - plane_z) <= _BACKGROUND_HALF_HEIGHT_MM) & (inside >= clear)
    mask &= _axis_distance(y, x, axis) >= LUNG_DIAMETER_MM / 2 + clear
    for centre, radius in zip(centres, radii, strict=True):
        r2 = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
        mask &= r2 >= (radius + wall_mm + clear) ** 2
    return mask


def _box(centre, reach, shape, spacing) -> tuple[slice, ...]:
    low = np.maximum(np.floor((np.asarray(centre) - reach) / spacing).astype(int), 0)
    high = np.minimum(np.ceil((np.asarray(centre) + reach) / spacing).astype(int) + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))


def _fit_sphere(data, spacing, start, radius, level, inside, axis, others, wall_mm) -> dict:
    """Least-squares fit of `sphere_profile` to the voxels around one sphere."""
    reach = radius + wall_mm + _FIT_MARGIN_MM
    box = _box(start, reach, data.shape, spacing)
    z, y, x = _grid(data.shape, spacing, box)
    values = data[box]
    clear = _FIT_CLEARANCE_MM
    keep = inside[box] >= clear
    keep &= _axis_distance(y, x, axis) >= LUNG_DIAMETER_MM / 2 + clear
    for centre, other in others:
        r2 = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
        keep &= r2 >= (other + wall_mm + clear) ** 2
    # Start from the centre of mass of the excess over the background near the ring's position.
    centre = np.asarray(start, np.float64)
    for _ in range(2):
        r = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
        weight = np.where((r <= radius + 3.0) & keep, np.maximum(values - level, 0.0), 0.0)
        total = weight.sum()
        if total > 0:
            centre = np.array([(weight * c).sum() / total for c in np.broadcast_arrays(z, y, x)])
    r = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    keep &= r <= reach
    zz, yy, xx = (np.broadcast_to(c, values.shape)[keep] for c in (z, y, x))
    measured = values[keep]
    if measured.size < 10:
        raise NemaError(
            f"too few voxels around the {2 * radius:g} mm sphere to fit it (is the body cut "
            "by the field of view?)"
        )

    def residuals(p):
        distance = np.sqrt((zz - p[0]) ** 2 + (yy - p[1]) ** 2 + (xx - p[2]) ** 2)
        return sphere_profile(distance, radius, p[5], p[3], p[4], wall_mm) - measured

    inner = measured[r[keep] <= radius]
    activity0 = float(inner.max()) if inner.size else float(measured.max())
    shift = max(radius, 6.0)
    p0 = np.array([*centre, max(activity0, level * 1.01, 1e-6), max(level, 1e-6), 2.0])
    lower = [*(centre - shift), 0.0, 0.0, _SIGMA_BOUNDS_MM[0]]
    upper = [*(centre + shift), np.inf, np.inf, _SIGMA_BOUNDS_MM[1]]
    fit = optimize.least_squares(residuals, p0, bounds=(lower, upper), x_scale="jac")
    p = fit.x
    return {
        "centre": p[:3].copy(),
        "activity": float(p[3]),
        "background": float(p[4]),
        "sigma": float(p[5]),
        "fitted_voxels": int(measured.size),
        "box": box,
    }


def _peak(smooth, spacing, centre, radius) -> float:
    """The smoothed scan's maximum within a sphere's radius (at least its nearest voxel)."""
    box = _box(centre, radius + spacing.max(), smooth.shape, spacing)
    z, y, x = _grid(smooth.shape, spacing, box)
    r = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    values = smooth[box]
    if values.size == 0:
        return -np.inf  # outside the field of view
    inside = r <= max(radius, float(r.min()))
    return float(values[inside].max())


def _sphere_record(volume, data, spacing, fit, radius, diameter, bg_mean, truth, wall_mm, index):
    """RCs, EARL flags and the binned radial profile of one fitted sphere."""
    centre = fit["centre"]
    box = fit["box"]
    z, y, x = _grid(data.shape, spacing, box)
    values = data[box]
    r = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    # Voxels whose centres are in the sphere (at least the nearest one for a small sphere).
    in_sphere = r <= max(radius, float(r.min()))
    maximum = float(values[in_sphere].max())
    mean = float(values[in_sphere].mean())
    hottest = np.unravel_index(np.argmax(np.where(in_sphere, values, -np.inf)), values.shape)
    threshold = bg_mean + 0.5 * (maximum - bg_mean)
    near = (values >= threshold) & (r <= radius + wall_mm + FWHM_PER_SIGMA * fit["sigma"])
    # 26-connected: a noisy (or deconvolved) sphere's hot voxels often touch only at edges.
    labels, _ = ndimage.label(near, np.ones((3, 3, 3)))
    a50 = labels == labels[hottest] if labels[hottest] else np.zeros_like(near)
    a50[hottest] = True
    a50_mean = float(values[a50].mean())
    rc = {"rc_max": maximum / truth, "rc_mean": mean / truth, "rc_a50": a50_mean / truth}
    earl = {}
    for name, bands in EARL_BANDS.items():
        earl[name] = {}
        for key in ("rc_a50", "rc_max"):
            low, high = bands[key][0][index], bands[key][1][index]
            value = rc[key]
            earl[name][key] = "pass" if low <= value <= high else ("low" if value < low else "high")
    voxel = centre / spacing
    world = volume.affine @ np.array([voxel[2], voxel[1], voxel[0], 1.0])
    edges = np.arange(0.0, radius + wall_mm + _FIT_MARGIN_MM + 1.0, 1.0)
    which = np.digitize(r.ravel(), edges) - 1
    sums = np.bincount(which, weights=values.ravel(), minlength=len(edges))[: len(edges) - 1]
    counts = np.bincount(which, minlength=len(edges))[: len(edges) - 1]
    filled = counts > 0
    mids = 0.5 * (edges[:-1] + edges[1:])[filled]
    model = sphere_profile(mids, radius, fit["sigma"], fit["activity"], fit["background"], wall_mm)
    return {
        "diameter_mm": float(diameter),
        "fwhm_mm": FWHM_PER_SIGMA * fit["sigma"],
        **rc,
        "max": maximum,
        "mean": mean,
        "a50_mean": a50_mean,
        "a50_voxels": int(a50.sum()),
        "fitted_activity": fit["activity"],
        "fitted_background": fit["background"],
        "fitted_voxels": fit["fitted_voxels"],
        "centre_voxel": voxel.tolist(),
        "centre_mm": world[:3].tolist(),
        "earl": earl,
        "profile": {
            "r_mm": mids.tolist(),
            "mean": (sums[filled] / counts[filled]).tolist(),
            "fit": model.tolist(),
        },
    }


def _background_variability(data, spacing, centres, radii, axis, inside, wall_mm) -> dict:
    """NEMA NU 2 background variability and lung residual.

    Twelve 37 mm ROIs per slice on the sphere plane and ± 10, ± 20 mm, placed automatically:
    spread out (farthest-point order) over the positions where a 37 mm disc keeps 15 mm from
    the body's edge, every sphere's wall and the lung insert. ROIs of the smaller sphere sizes
    are concentric. BV_d = SD of the 60 ROI means / their mean, in %. Lung residual: a 30 mm
    ROI on the lung insert's axis over the 37 mm ROIs' mean, per slice, averaged, in %.
    Returns None values (with the reason) when the scan cannot hold them.
    """
    plane_z = float(np.mean([c[0] for c in centres]))
    slices = [int(round((plane_z + offset) / spacing[0])) for offset in _BV_OFFSETS_MM]
    empty = {"variability_percent": None, "lung_residual_percent": None}
    if min(slices) < 0 or max(slices) >= data.shape[0]:
        return {**empty, "variability_note": "the scan does not reach 20 mm from the sphere plane"}
    plane = int(round(plane_z / spacing[0]))
    _, y, x = _grid((1, *data.shape[1:]), spacing)
    y, x = y[0], x[0]
    clear = _BACKGROUND_CLEARANCE_MM
    allowed = (inside[plane] >= clear) & (
        _axis_distance(y, x, axis) >= LUNG_DIAMETER_MM / 2 + clear
    )
    for centre, radius in zip(centres, radii, strict=True):
        allowed &= np.hypot(y - centre[1], x - centre[2]) >= radius + wall_mm + clear
    room = ndimage.distance_transform_edt(allowed, sampling=spacing[1:])
    candidates = np.argwhere(room >= max(DIAMETERS_MM) / 2)
    if len(candidates) < _BV_ROIS_PER_SLICE:
        return {**empty, "variability_note": "no room for 12 background ROIs of 37 mm"}
    points = candidates * spacing[1:]
    chosen = [int(np.argmax(np.hypot(points[:, 0] - axis[0], points[:, 1] - axis[1])))]
    nearest = np.hypot(*(points - points[chosen[0]]).T)
    while len(chosen) < _BV_ROIS_PER_SLICE:
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, np.hypot(*(points - points[chosen[-1]]).T))
    rois = points[chosen]
    distances = [np.hypot(y - cy, x - cx) for cy, cx in rois]
    means = {d: [] for d in DIAMETERS_MM}
    lung_ratios = []
    lung_roi = _axis_distance(y, x, axis) <= _LUNG_ROI_DIAMETER_MM / 2
    for k in slices:
        for diameter in DIAMETERS_MM:
            for distance in distances:
                means[diameter].append(float(data[k][distance <= diameter / 2].mean()))
        reference = np.mean(means[max(DIAMETERS_MM)][-len(distances) :])
        lung_ratios.append(float(data[k][lung_roi].mean() / reference))
    variability = {}
    for diameter, values in means.items():
        values = np.asarray(values)
        variability[f"{diameter:g}"] = float(100.0 * values.std(ddof=1) / values.mean())
    return {
        "variability_percent": variability,
        "roi_mean_37": float(np.mean(means[max(DIAMETERS_MM)])),
        "lung_residual_percent": float(100.0 * np.mean(lung_ratios)),
        "roi_centres_voxel": (rois / spacing[1:]).tolist(),
        "roi_slices": slices,
    }


# ---------------------------------------------------------------------------------------------
# Before and after


def compare(before: dict, after: dict) -> dict:
    """What an enhancement (or any post-processing) changed, from two `analyse` results.

    The after RCs are taken against the before's true activity (they are rescaled when the two
    analyses used different ones), so a changed plateau shows as a changed RC. Returns
    `spheres` (per sphere: FWHM before, after and their ratio; RC_A50 and RC_max before and
    after), `background_cov_ratio`, `background_mean_change_percent`,
    `total_activity_change_percent` and the `true_activity` used.
    """
    if before.get("units") != after.get("units"):
        raise NemaError(
            f"cannot compare a scan in {before.get('units')} with one in {after.get('units')}; "
            "convert one of them first"
        )
    scale = after["true_activity"] / before["true_activity"]
    after_spheres = {s["diameter_mm"]: s for s in after["spheres"]}
    spheres = []
    for b in before["spheres"]:
        a = after_spheres[b["diameter_mm"]]
        spheres.append(
            {
                "diameter_mm": b["diameter_mm"],
                "fwhm_before_mm": b["fwhm_mm"],
                "fwhm_after_mm": a["fwhm_mm"],
                "fwhm_ratio": _ratio(a["fwhm_mm"], b["fwhm_mm"]),
                "rc_a50_before": b["rc_a50"],
                "rc_a50_after": a["rc_a50"] * scale,
                "rc_max_before": b["rc_max"],
                "rc_max_after": a["rc_max"] * scale,
            }
        )
    bb, ab = before["background"], after["background"]
    return {
        "spheres": spheres,
        "background_cov_ratio": _ratio(ab["cov"], bb["cov"]),
        "background_mean_change_percent": _change_percent(ab["mean"], bb["mean"]),
        "total_activity_change_percent": _change_percent(
            after["total_activity"], before["total_activity"]
        ),
        "true_activity": before["true_activity"],
    }


def _ratio(new, old) -> float | None:
    """new / old, or None (JSON null) where it is undefined (a noise-free background's CoV)."""
    if new is None or old is None or not old:
        return None
    return float(new / old)


def _change_percent(new, old) -> float | None:
    ratio = _ratio(new, old)
    return None if ratio is None else 100.0 * (ratio - 1.0)


def _number(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


# ---------------------------------------------------------------------------------------------
# Reports


def markdown(result: dict, *, after: dict | None = None, labels=("input", "after")) -> str:
    """The analysis (and, with `after`, its analysis and the before/after table) as markdown."""
    parts = [_markdown_one(result, labels[0])]
    if after is not None:
        parts.append(_markdown_one(after, labels[1]))
        parts.append(_markdown_compare(compare(result, after), labels))
    return "\n\n".join(parts) + "\n"


def _markdown_one(result: dict, label: str) -> str:
    units = result["units"]
    lines = [
        f"## NEMA IQ phantom: {label}",
        "",
        f"True sphere activity {result['true_activity']:.6g} {units} "
        f"({result['true_activity_source']}); sphere plane at slice "
        f"{result['sphere_plane_slice']}.",
        "",
        "| sphere (mm) | FWHM (mm) | RC_max | RC_mean | RC_A50 | EARL1 A50 / max | "
        "EARL2 A50 / max |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in result["spheres"]:
        flags = [f"{s['earl'][n]['rc_a50']} / {s['earl'][n]['rc_max']}" for n in EARL_BANDS]
        lines.append(
            f"| {s['diameter_mm']:g} | {s['fwhm_mm']:.2f} | {s['rc_max']:.3f} | "
            f"{s['rc_mean']:.3f} | {s['rc_a50']:.3f} | {flags[0]} | {flags[1]} |"
        )
    bg = result["background"]
    lines += [
        "",
        f"Background: mean {bg['mean']:.6g} {units}, voxel CoV {_number(bg['cov'], '.3f')} "
        f"({bg['voxels']} voxels); total activity {result['total_activity']:.6g} "
        f"{result['total_activity_units']}.",
    ]
    if bg.get("variability_percent"):
        cells = ", ".join(f"{d} mm {v:.2f} %" for d, v in bg["variability_percent"].items())
        lines.append(
            f"NEMA NU 2 background variability: {cells}; lung residual "
            f"{bg['lung_residual_percent']:.1f} %."
        )
    return "\n".join(lines)


def _markdown_compare(comparison: dict, labels) -> str:
    b, a = labels
    lines = [
        f"## {a} vs {b}",
        "",
        f"RCs against {comparison['true_activity']:.6g} (the {b}'s true activity).",
        "",
        f"| sphere (mm) | FWHM {b} | FWHM {a} | FWHM ratio | RC_A50 {b} | RC_A50 {a} | "
        f"RC_max {b} | RC_max {a} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in comparison["spheres"]:
        lines.append(
            f"| {s['diameter_mm']:g} | {s['fwhm_before_mm']:.2f} | {s['fwhm_after_mm']:.2f} | "
            f"{s['fwhm_ratio']:.2f} | {s['rc_a50_before']:.3f} | {s['rc_a50_after']:.3f} | "
            f"{s['rc_max_before']:.3f} | {s['rc_max_after']:.3f} |"
        )
    lines += [
        "",
        f"Background CoV ratio {_number(comparison['background_cov_ratio'], '.2f')}, "
        f"background mean {_number(comparison['background_mean_change_percent'], '+.2f')} %, "
        f"total activity {_number(comparison['total_activity_change_percent'], '+.2f')} %.",
    ]
    return "\n".join(lines)


def figure(result: dict, *, after: dict | None = None, labels=("input", "after")):
    """RC_A50 and RC_max against sphere diameter with the EARL bands, and the fitted radial
    profiles (binned voxel means as dots, the fitted model as lines) over the true activity."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    analyses = [(labels[0], result)] + ([(labels[1], after)] if after is not None else [])
    fig, axes = plt.subplots(1, 2 + len(analyses), figsize=(5.2 * (2 + len(analyses)), 4.4))
    diameters = np.array(DIAMETERS_MM)
    colours = {"EARL1": "tab:blue", "EARL2": "tab:green"}
    for ax, key, title in ((axes[0], "rc_a50", "RC_A50"), (axes[1], "rc_max", "RC_max")):
        for name, bands in EARL_BANDS.items():
            for d, low, high in zip(diameters, *bands[key], strict=True):
                ax.add_patch(
                    matplotlib.patches.Rectangle(
                        (d - 0.8, low), 1.6, high - low, color=colours[name], alpha=0.25, lw=0
                    )
                )
            ax.plot([], [], color=colours[name], alpha=0.4, lw=6, label=f"{name} band")
        scale = 1.0
        for (label, analysis), marker in zip(analyses, ("o", "s"), strict=False):
            if analysis is not result:
                scale = analysis["true_activity"] / result["true_activity"]
            values = [s[key] * scale for s in analysis["spheres"]]
            ax.plot(
                diameters,
                values,
                marker + "-",
                color="k" if marker == "o" else "tab:red",
                label=label,
            )
        ax.set_xlabel("sphere diameter (mm)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs true activity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    cmap = plt.get_cmap("viridis")
    for ax, (label, analysis) in zip(axes[2:], analyses, strict=True):
        truth = result["true_activity"]
        for i, s in enumerate(analysis["spheres"]):
            colour = cmap(i / (len(analysis["spheres"]) - 1))
            profile = s["profile"]
            r = np.asarray(profile["r_mm"])
            ax.plot(r, np.asarray(profile["mean"]) / truth, ".", color=colour, ms=4)
            ax.plot(
                r,
                np.asarray(profile["fit"]) / truth,
                "-",
                color=colour,
                label=f"{s['diameter_mm']:g} mm: FWHM {s['fwhm_mm']:.1f}",
            )
        ax.set_xlabel("distance from the fitted centre (mm)")
        ax.set_ylabel("activity / true sphere activity")
        ax.set_title(f"radial profiles, {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_report(
    out_dir, result: dict, *, after: dict | None = None, labels=("input", "after")
) -> list[Path]:
    """Write `nema.json`, `nema.md` and `nema.png` into `out_dir`, all or nothing.

    `nema.json` is `result`, plus `after` (its analysis) and `comparison` (`compare`) when
    `after` is given. The folder is written under a temporary name and renamed; an existing
    `out_dir` that is not empty is refused.
    """
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    refuse_existing_target(out_dir, " (choose another output folder)")
    record = dict(result)
    if after is not None:
        record["after"] = {"label": labels[1], **after}
        record["comparison"] = compare(result, after)
    fig = figure(result, after=after, labels=labels)
    png = _io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    temporary = temporary_name(out_dir)
    try:
        temporary.mkdir(parents=True)
        (temporary / "nema.json").write_text(json.dumps(record, indent=2) + "\n")
        (temporary / "nema.md").write_text(markdown(result, after=after, labels=labels))
        (temporary / "nema.png").write_bytes(png.getvalue())
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (refused otherwise): replaced by the complete folder
        commit([Staged(temporary, out_dir)])
    except BaseException:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    finally:
        remove_quietly(temporary)
    return [out_dir / name for name in FILES]


# ---------------------------------------------------------------------------------------------
# Scans on disk (launch/nema.py)


def measure_scan(
    input_path,
    out_dir,
    *,
    true_activity=None,
    workdir=None,
    compare_path=None,
    psf_fwhm_mm=None,
) -> str:
    """Analyse the scan at `input_path` (a DICOM series folder or NIfTI file) and write the
    report into `out_dir` (`write_report`); return the markdown tables.

    `workdir` also enhances the scan with that trained run (`petsr_jax.load(workdir)(volume)`),
    `compare_path` reads another scan of the phantom (an enhanced or deconvolved one); either is
    analysed against the input's true activity and compared. An existing `out_dir` that is not
    empty is refused before any work; nothing is written when anything fails, and a refusal
    names the scan it refused.
    """
    from petsr_jax import io

    if workdir and compare_path:
        raise NemaError("give a workdir to enhance with or a scan to compare with, not both")
    out_dir = Path(out_dir)
    refuse_existing_target(out_dir, " (choose another output folder)")
    volume = io.read_volume(input_path)
    result = _analyse_named(volume, true_activity, str(input_path))
    after, labels = None, ("input", "after")
    if workdir:
        from petsr_jax.inference import load

        # A scanner-trained model is told the scan's resolution (`SuperResolver.fwhm_pixels`).
        enhanced = load(workdir)(volume, psf_fwhm_mm=psf_fwhm_mm)
        name = f"{input_path} enhanced by {workdir}"
        after = _analyse_named(enhanced, result["true_activity"], name)
        labels = ("input", f"enhanced ({Path(workdir).name})")
    elif compare_path:
        other = io.read_volume(compare_path)
        after = _analyse_named(other, result["true_activity"], str(compare_path))
        labels = ("input", Path(compare_path).name.removesuffix(".gz").removesuffix(".nii"))
    write_report(out_dir, result, after=after, labels=labels)
    return markdown(result, after=after, labels=labels)


def _analyse_named(volume, true_activity, name: str) -> dict:
    """`analyse`, its refusal naming the scan it refused."""
    try:
        return analyse(volume, true_activity)
    except NemaError as error:
        raise NemaError(f"{name}: {error}") from None
