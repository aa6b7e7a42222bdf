"""A scan resampled to another voxel size, or onto another scan's grid, geometry kept true.

    import petsr_jax
    volume = petsr_jax.io.read_volume("scan/")                 # e.g. 4.07 mm pixels
    at_training = petsr_jax.io.resample(volume, 2.34)           # 2.34 × 2.34 mm pixels
    enhanced = sr(at_training)                                   # the model's pixel size
    back = petsr_jax.io.resample(enhanced, like=volume)          # on the input's grid again

The networks learned structures of a size in pixels, so a scan whose pixels differ from the
training data's is best enhanced at the training pixel size (`data_info.json`'s
`pixel_spacing_mm`; `launch/enhance.py --resample` does the round trip above for every scan).

Conventions, chosen so that the result is the same scan on another grid:

- **Field of view.** Voxel values are samples at voxel centres, and a voxel covers a cell
  around its centre, as in DICOM and NIfTI. The new grid keeps each axis's direction, takes
  `round(n · old / new)` voxels of the new spacing, and is centred on the old grid: the first
  centre moves by `((n − 1) · old − (m − 1) · new) / 2` along the axis, so the voxel cells cover
  the same field of view (exactly when `n · old / new` is whole, within half a voxel otherwise).
  The affine, the spacing, and the copied DICOM headers' Rows, Columns, PixelSpacing and
  ImagePositionPatient describe the new grid; the headers are marked DERIVED with a
  DerivationDescription saying what was resampled, and `meta["resampled"]` records it.
- **Values.** PET voxels hold an activity concentration (Bq/mL, SUV), an intensive quantity: a
  resampled voxel holds the concentration at its centre, interpolated linearly (default) or
  with cubic B-splines, in the same units, not a sum of counts scaled by the voxel volume. The
  total activity (concentration × voxel volume, summed) is kept up to interpolation error.
  Cubic splines can undershoot next to hot structures; a non-negative input stays
  non-negative (negative results are set to 0).
- **Antialiasing.** Sampling at a coarser spacing without a low-pass filter aliases noise and
  fine structure; each downsampled axis is first smoothed with a Gaussian of
  `σ = (factor − 1) / 2` old voxels (scikit-image's `resize` default), which leaves upsampled
  and unchanged axes untouched.
- **Edges.** A new centre within half an old voxel outside the outermost old centres takes the
  edge value (the old voxel's cell still covers it); one farther out holds no data and is 0.
"""

from __future__ import annotations

import copy
import math

import numpy as np
from scipy import ndimage

from petsr_jax.io.geometry import LPS_TO_RAS, affine_in
from petsr_jax.volume import Volume

METHODS = {"linear": 1, "cubic": 3}


def resample(
    volume: Volume,
    spacing_mm=None,
    *,
    slice_spacing_mm: float | None = None,
    like: Volume | None = None,
    method: str = "linear",
    antialias: bool = True,
) -> Volume:
    """`volume` resampled to a new in-plane pixel spacing, slice spacing, or onto `like`'s grid.

    Args:
      volume: the scan, values in physical units (see the module docstring for conventions).
      spacing_mm: the new in-plane pixel spacing in mm: one number for square pixels, or
        `(row spacing, column spacing)` as DICOM's PixelSpacing and `data_info.json` give it;
        None keeps the in-plane grid.
      slice_spacing_mm: the new distance between slices in mm; None keeps the slices.
      like: resample onto this volume's grid instead (its shape, spacing and affine; its axes
        must be parallel to `volume`'s): the way back after enhancing a resampled scan.
      method: "linear" (default) or "cubic" (B-splines).
      antialias: smooth each downsampled axis first (see the module docstring).

    Returns:
      A Volume on the new grid, in `volume`'s units and space, with its headers and meta
      updated to that grid and marked as resampled.

    Raises:
      ValueError: a spacing that is not a positive number, an unknown method, neither a
        spacing nor `like` given, or a `like` whose axes are not parallel to the volume's.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    source_affine = affine_in(volume, volume.space)
    if like is not None:
        if spacing_mm is not None or slice_spacing_mm is not None:
            raise ValueError("give either like= or spacing_mm / slice_spacing_mm, not both")
        target_affine = affine_in(like, volume.space)
        target_shape = like.shape
    elif spacing_mm is None and slice_spacing_mm is None:
        raise ValueError("give spacing_mm (in-plane), slice_spacing_mm, or like=")
    else:
        target_affine, target_shape = _grid_for(
            source_affine, volume.shape, _in_plane(spacing_mm), _positive(slice_spacing_mm)
        )
    scale, offset = _index_map(source_affine, target_affine)
    data = _interpolate(volume.data, scale, offset, target_shape, METHODS[method], antialias)
    old = _spacing(source_affine)
    new = _spacing(target_affine)
    note = (
        f"resampled from {_mm3(old)} to {_mm3(new)} mm voxels ({method}"
        + (", antialiased" if antialias and np.any(np.abs(scale) > 1 + 1e-6) else "")
        + ")"
    )
    meta = {
        **volume.meta,
        "resampled": {
            "from_spacing_mm": list(old),
            "to_spacing_mm": list(new),
            "from_shape": list(volume.shape),
            "method": method,
            "antialias": bool(antialias),
        },
    }
    headers = None
    if volume.headers:
        lps = target_affine if volume.space == "LPS" else LPS_TO_RAS @ target_affine
        headers = _regridded_headers(volume.headers, scale[0], offset[0], lps, target_shape, note)
    return volume.replace(data=data, spacing=new, affine=target_affine, headers=headers, meta=meta)


def _positive(value) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"a spacing must be a positive number of mm, got {value!r}")
    return number


def _in_plane(spacing_mm) -> tuple[float, float] | None:
    """`(row, column)` spacing from one number or a pair; None stays None."""
    if spacing_mm is None:
        return None
    values = np.atleast_1d(np.asarray(spacing_mm, dtype=object)).tolist()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise ValueError(
            f"spacing_mm: expected one number or (row, column) in mm, got {spacing_mm!r}"
        )
    return _positive(values[0]), _positive(values[1])


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """`(z, y, x)` voxel size in mm of an affine whose columns are the i (column), j (row) and
    k (slice) axes."""
    dx, dy, dz = np.linalg.norm(affine[:3, :3], axis=0)
    return float(dz), float(dy), float(dx)


def _mm3(spacing) -> str:
    return " × ".join(f"{s:.3g}" for s in spacing)


def _grid_for(affine: np.ndarray, shape, in_plane, slice_spacing) -> tuple[np.ndarray, tuple]:
    """The affine and shape of the centred grid with the new spacings (module docstring)."""
    slices, rows, columns = shape
    new = affine.copy()
    sizes = {0: columns, 1: rows, 2: slices}  # affine column → voxels along it
    wanted = {2: slice_spacing}
    if in_plane is not None:
        wanted[1], wanted[0] = in_plane  # (row spacing, column spacing)
    new_sizes = dict(sizes)
    for axis, step in wanted.items():
        if step is None:
            continue
        old_step = float(np.linalg.norm(affine[:3, axis]))
        n = sizes[axis]
        m = max(1, int(round(n * old_step / step)))
        direction = affine[:3, axis] / old_step
        new[:3, axis] = direction * step
        new[:3, 3] += direction * ((n - 1) * old_step - (m - 1) * step) / 2
        new_sizes[axis] = m
    return new, (new_sizes[2], new_sizes[1], new_sizes[0])


def _index_map(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per array axis (slice, row, column): `source index = scale · target index + offset`.

    Both grids must have parallel axes (a flip is fine): the map is then one scale and shift
    per axis, which keeps the interpolation separable and the antialiasing per axis.
    """
    to_source = np.linalg.solve(source, target)  # target (i, j, k, 1) → source (i, j, k, 1)
    linear = to_source[:3, :3]
    off_diagonal = linear - np.diag(np.diag(linear))
    if np.max(np.abs(off_diagonal)) > 1e-6 * max(1.0, np.max(np.abs(linear))):
        raise ValueError(
            "like: its voxel axes are not parallel to the volume's (another orientation); "
            "resample onto a grid with the same axes, e.g. one made by resample(spacing_mm=...)"
        )
    # Array axes are (k, j, i): the reverse of the affine's (i, j, k).
    return np.diag(linear)[::-1].copy(), to_source[:3, 3][::-1].copy()


def _interpolate(data, scale, offset, shape, order: int, antialias: bool) -> np.ndarray:
    """`data` sampled at `scale · index + offset` per axis (see `_index_map` and the module
    docstring for smoothing, edges and the non-negativity of a non-negative input)."""
    data = np.asarray(data, np.float32)
    if antialias:
        sigma = [max(0.0, (abs(s) - 1) / 2) for s in scale]
        if any(sigma):
            data = ndimage.gaussian_filter(data, sigma, mode="nearest")
    out = ndimage.affine_transform(
        data,
        scale,
        offset=offset,
        output_shape=tuple(int(n) for n in shape),
        order=order,
        mode="nearest",
        output=np.float32,
        prefilter=order > 1,
    )
    # Centres beyond the source's outermost cells hold no data.
    for axis, (s, o, n_source) in enumerate(zip(scale, offset, data.shape, strict=True)):
        where = s * np.arange(out.shape[axis]) + o
        outside = (where < -0.5 - 1e-6) | (where > n_source - 0.5 + 1e-6)
        if outside.any():
            index = [slice(None)] * 3
            index[axis] = outside
            out[tuple(index)] = 0
    if order > 1 and float(np.min(data, initial=0.0)) >= 0:
        np.maximum(out, 0, out=out)
    return out


def _regridded_headers(headers, k_scale, k_offset, lps_affine, shape, note: str) -> list:
    """Copies of the source headers describing the new grid: for each new slice, the header of
    the nearest source slice with the new size, spacing and position, marked as derived."""
    from pydicom.valuerep import format_number_as_ds

    def ds(value) -> str:
        return format_number_as_ds(float(value))

    slices, rows, columns = shape
    dz, dy, dx = _spacing(lps_affine)
    normal = np.cross(lps_affine[:3, 0], lps_affine[:3, 1])
    normal /= np.linalg.norm(normal)
    regridded = []
    for k in range(slices):
        nearest = int(np.clip(round(k_scale * k + k_offset), 0, len(headers) - 1))
        header = copy.deepcopy(headers[nearest])
        position = lps_affine[:3, 3] + k * lps_affine[:3, 2]
        header.Rows, header.Columns = rows, columns
        header.PixelSpacing = [ds(dy), ds(dx)]
        header.ImagePositionPatient = [ds(v) for v in position]
        if "SliceLocation" in header:
            header.SliceLocation = ds(position @ normal)
        if "SpacingBetweenSlices" in header:
            header.SpacingBetweenSlices = ds(dz)
        if "NumberOfSlices" in header:
            header.NumberOfSlices = slices
        image_type = list(header.get("ImageType", []) or ["ORIGINAL", "PRIMARY"])
        header.ImageType = ["DERIVED", *image_type[1:]]
        previous = str(header.get("DerivationDescription", "") or "")
        header.DerivationDescription = (f"{previous}; " if previous else "") + note
        regridded.append(header)
    return regridded
