"""A digital NEMA NU 2 image-quality phantom whose truth is known: geometry, activities, PSF.

The NEMA analysis (`petsr_jax.evaluation.nema`) is the project's measuring instrument for real
scans; this phantom is what proves the instrument. It holds the parts the analysis relies on:

* the body: a warm prism 224 mm high and 294 mm wide (a half-disc of radius 147 mm over a
  block with 77 mm rounded corners, close to the IEC body's interior), `phantom_length_mm` long;
* the cold lung insert: a 51 mm cylinder along the axis, through the whole length;
* six hot spheres of inner diameter 37, 28, 22, 17, 13 and 10 mm, centres on a 57.2 mm ring
  around the lung insert in one transverse plane, 60° apart in order of size, each inside a cold
  1.5 mm glass wall, `sphere_to_lid_mm` from one end of the body.

The image is the truth blurred by an isotropic Gaussian PSF of `fwhm_mm` and read at the voxel
centres (the resolution a fitted FWHM reports is then exactly `fwhm_mm`). Each part is drawn on
a grid `supersample` times finer than the voxels, with partial volumes at its edges, blurred
there with `scipy.ndimage.gaussian_filter` and sampled at the voxel centres, which the fine grid
holds: the spheres in a local 3D box each, the body and lung in plane times along the axis
(the blur of a prism is the product of its in-plane and axial blurs). The image is the sum of
the parts' blurred images (blurring is linear): warm body, minus the lung insert, minus each
sphere with its wall (background), plus each sphere's activity.

The sphere geometry is written out here, not imported from the analysis: the phantom is the
physical object the analysis must find, and tests that compare the two stay independent.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from petsr_jax.volume import Volume

# Inner diameters of the six spheres, in ring order from the largest (mm).
SPHERE_DIAMETERS_MM = (37.0, 28.0, 22.0, 17.0, 13.0, 10.0)
SPHERE_RING_RADIUS_MM = 57.2
GLASS_WALL_MM = 1.5
LUNG_INSERT_DIAMETER_MM = 51.0
# Body cross-section (phantom frame: u across, v towards the flat side, origin the ring centre).
_TOP_RADIUS_MM = 147.0  # half-disc above the block, centred _BLOCK_TOP_MM below the ring
_BLOCK_TOP_MM = 35.0
_BLOCK_HEIGHT_MM = 77.0  # the block's depth below the half-disc's diameter
_CORNER_RADIUS_MM = 77.0
_TRUNCATE = 4.0  # Gaussian kernels reach 4 sigma, as scipy's default


def fwhm_to_sigma(fwhm):
    """Gaussian sigma of a full width at half maximum."""
    return np.asarray(fwhm, np.float64) / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def nema_phantom(
    *,
    spacing=(2.0, 2.0, 2.0),
    shape=(48, 160, 160),
    fwhm_mm: float = 4.3,
    sphere_activity: float = 4.0,
    background_activity: float = 1.0,
    sphere_plane: float | None = None,
    ring_centre: tuple[float, float] | None = None,
    rotation_deg: float = 0.0,
    mirrored: bool = False,
    phantom_length_mm: float = 180.0,
    sphere_to_lid_mm: float = 70.0,
    noise: float = 0.0,
    seed: int = 0,
    supersample: int = 5,
    units: str = "BQML",
) -> Volume:
    """The phantom as a `Volume` of `shape` `(slices, rows, cols)` voxels of `spacing` mm.

    Args:
      spacing: `(z, y, x)` voxel size in mm.
      fwhm_mm: FWHM of the isotropic Gaussian PSF; 0 gives the unblurred partial-volume truth.
      sphere_activity, background_activity: activity concentrations (4:1 by default).
      sphere_plane: slice index (may be fractional) of the sphere centres; default the middle.
      ring_centre: `(row, col)` index of the lung insert's axis; default the middle.
      rotation_deg: rotation of the phantom about its axis (0: the 37 mm sphere towards +col,
        the flat side towards +row); `mirrored` flips it (the spheres run the other way round).
      phantom_length_mm, sphere_to_lid_mm: the body's length, and where the sphere plane lies
        in it; the field of view may hold only part of it.
      noise: standard deviation of the noise in the background as a fraction of its activity;
        the variance follows the activity (Poisson-like), and the result is clipped at 0.
      supersample: fine-grid points per voxel along each axis (odd, so voxel centres are on it).

    The truth is in `volume.meta["nema_phantom"]`: sphere centres as voxel indices `(z, y, x)`,
    diameters, activities, FWHM, ring centre, rotation and mirror.
    """
    if supersample < 1 or supersample % 2 == 0:
        raise ValueError(f"supersample must be an odd positive integer, got {supersample}")
    spacing = np.asarray(spacing, np.float64)
    shape = tuple(int(n) for n in shape)
    sigma = float(fwhm_to_sigma(fwhm_mm))
    plane = (shape[0] - 1) / 2 if sphere_plane is None else float(sphere_plane)
    centre_yx = (
        np.array([(shape[1] - 1) / 2, (shape[2] - 1) / 2])
        if ring_centre is None
        else np.asarray(ring_centre, np.float64)
    )
    # Ring centre in grid millimetres (index × spacing), z then y then x.
    origin = np.array([plane * spacing[0], centre_yx[0] * spacing[1], centre_yx[1] * spacing[2]])
    angle = np.radians(rotation_deg)
    side = -1.0 if mirrored else 1.0

    def to_phantom(dy, dx):
        """Phantom-frame (u, v) of in-plane offsets from the ring centre."""
        u = np.cos(angle) * dx + np.sin(angle) * dy
        v = -np.sin(angle) * dx + np.cos(angle) * dy
        return u, side * v

    axial = _slab(
        shape[0], spacing[0], origin[0], sphere_to_lid_mm, phantom_length_mm, sigma, supersample
    )
    inplane = _cross_section(shape[1:], spacing[1:], origin[1:], to_phantom, sigma, supersample)
    image = background_activity * inplane[None, :, :] * axial[:, None, None]

    centres = []
    for i, diameter in enumerate(SPHERE_DIAMETERS_MM):
        theta = angle + side * np.radians(60.0 * i)
        # The sphere's offset in the image follows from its phantom-frame angle i·60°.
        centre = origin + SPHERE_RING_RADIUS_MM * np.array([0.0, np.sin(theta), np.cos(theta)])
        _add_sphere(
            image,
            spacing,
            centre,
            diameter / 2,
            sphere_activity,
            background_activity,
            sigma,
            supersample,
        )
        centres.append((centre / spacing).tolist())

    if noise > 0:
        rng = np.random.default_rng(seed)
        spread = noise * np.sqrt(background_activity * np.maximum(image, 0.0))
        image = np.maximum(image + spread * rng.standard_normal(image.shape), 0.0)

    truth = {
        "fwhm_mm": float(fwhm_mm),
        "sphere_activity": float(sphere_activity),
        "background_activity": float(background_activity),
        "diameters_mm": list(SPHERE_DIAMETERS_MM),
        "centres_voxel": centres,
        "ring_centre_voxel": [plane, float(centre_yx[0]), float(centre_yx[1])],
        "rotation_deg": float(rotation_deg),
        "mirrored": bool(mirrored),
        "wall_mm": GLASS_WALL_MM,
        "noise": float(noise),
    }
    return Volume(
        data=image.astype(np.float32),
        spacing=tuple(spacing),
        units=units,
        patient_id="nema_phantom",
        meta={"nema_phantom": truth},
    )


def _fine_axis(n: int, step: float, f: int, pad: int) -> np.ndarray:
    """Grid-mm positions of a fine axis whose every `f`-th point (from `f // 2 + pad * f`) is
    a voxel centre, reaching `pad` voxels beyond both ends so edges outside the field of view
    still blur into it."""
    m = np.arange((n + 2 * pad) * f)
    return ((m - f // 2) / f - pad) * step


def _sample(fine: np.ndarray, f: int, pad: int, axis: int) -> np.ndarray:
    """The voxel-centre samples of a fine axis made by `_fine_axis`."""
    index = np.arange(f // 2 + pad * f, fine.shape[axis] - pad * f, f)
    return np.take(fine, index, axis=axis)


def _occupancy(distance_inside: np.ndarray, h: float) -> np.ndarray:
    """Partial volume of a fine cell from its centre's signed distance to an edge (positive
    inside): exact for an edge parallel to the cell's faces, close for a curved one."""
    return np.clip(0.5 + distance_inside / h, 0.0, 1.0)


def _pad_voxels(sigma: float, step: float) -> int:
    return int(np.ceil((_TRUNCATE * sigma + 2 * step) / step)) + 1


def _slab(n, step, plane_mm, to_lid, length, sigma, f) -> np.ndarray:
    """Blurred axial extent of the body, sampled at the slice centres."""
    pad = _pad_voxels(sigma, step)
    z = _fine_axis(n, step, f, pad) - plane_mm
    h = step / f
    inside = np.minimum(z + to_lid, (length - to_lid) - z)
    fine = _occupancy(inside, h)
    if sigma > 0:
        fine = ndimage.gaussian_filter1d(fine, sigma / h, mode="constant", truncate=_TRUNCATE)
    return _sample(fine, f, pad, 0)


def _cross_section(shape, spacing, origin_yx, to_phantom, sigma, f) -> np.ndarray:
    """Blurred body minus lung insert in plane, sampled at the voxel centres."""
    pads = [_pad_voxels(sigma, s) for s in spacing]
    y = _fine_axis(shape[0], spacing[0], f, pads[0]) - origin_yx[0]
    x = _fine_axis(shape[1], spacing[1], f, pads[1]) - origin_yx[1]
    u, v = to_phantom(y[:, None], x[None, :])
    h = float(np.mean(spacing)) / f
    # Signed distance inside the body: the half-disc above the block's top, the block below it
    # with quarter-circle lower corners (centres at u = ±(147 − 77) on the block's top).
    corner_u = _TOP_RADIUS_MM - _CORNER_RADIUS_MM
    top = _TOP_RADIUS_MM - np.hypot(u, v - _BLOCK_TOP_MM)
    bottom = _BLOCK_TOP_MM + _BLOCK_HEIGHT_MM - v
    corner = _CORNER_RADIUS_MM - np.hypot(np.abs(u) - corner_u, v - _BLOCK_TOP_MM)
    block = np.where(np.abs(u) > corner_u, np.minimum(corner, bottom), bottom)
    inside = np.where(v <= _BLOCK_TOP_MM, top, block)
    body = _occupancy(inside, h)
    lung = _occupancy(LUNG_INSERT_DIAMETER_MM / 2 - np.hypot(u, v), h)
    fine = body - lung
    if sigma > 0:
        fine = ndimage.gaussian_filter(
            fine, (sigma / (spacing[0] / f), sigma / (spacing[1] / f)), mode="constant"
        )
    return _sample(_sample(fine, f, pads[0], 0), f, pads[1], 1)


def _add_sphere(image, spacing, centre, radius, activity, background, sigma, f) -> None:
    """Add one sphere (activity inside, its cold wall replacing background) to `image`."""
    reach = radius + GLASS_WALL_MM + _TRUNCATE * sigma + 2 * float(spacing.max())
    low = np.floor((centre - reach) / spacing).astype(int)
    high = np.ceil((centre + reach) / spacing).astype(int)
    axes = []
    for k in range(3):
        count = high[k] - low[k] + 1
        m = np.arange(count * f)
        axes.append((low[k] + (m - f // 2) / f) * spacing[k] - centre[k])
    r = np.sqrt(
        axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    )
    h = float(np.mean(spacing)) / f
    fine = activity * _occupancy(radius - r, h) - background * _occupancy(
        radius + GLASS_WALL_MM - r, h
    )
    del r
    if sigma > 0:
        fine = ndimage.gaussian_filter(fine, sigma / (spacing / f), mode="constant")
    coarse = fine[f // 2 :: f, f // 2 :: f, f // 2 :: f]
    # Only the part of the box inside the field of view is added.
    dst, src = [], []
    for k in range(3):
        start = max(low[k], 0)
        stop = min(high[k] + 1, image.shape[k])
        if stop <= start:
            return
        dst.append(slice(start, stop))
        src.append(slice(start - low[k], stop - low[k]))
    image[tuple(dst)] += coarse[tuple(src)]
