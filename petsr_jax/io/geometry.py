"""Where voxels sit in the patient: slice order and affine of a DICOM series, the affine of a
grid being written, and the LPS / RAS conventions.

Kept apart from the file formats because both writers need the same grid (a super-resolved
volume keeps its source's field of view) and the DICOM reader and writer must agree on it.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from petsr_jax.io.errors import ScanError
from petsr_jax.volume import Volume

# DICOM LPS <-> NIfTI RAS: both are right-handed patient frames that differ by the sign of x, y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Relative tolerance on slice-position steps: a missing slice doubles a step, float noise in
# scanner headers stays far below 1 %.
_SLICE_STEP_TOLERANCE = 0.01


def _floats(header: Dataset, keyword: str, path, count: int) -> np.ndarray:
    """A required multi-valued numeric attribute, or a ScanError naming the file and field."""
    value = header.get(keyword)
    try:
        numbers = np.asarray([float(v) for v in value], np.float64)
    except (TypeError, ValueError):
        numbers = np.empty(0)
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise ScanError(f"{path}: {keyword} must hold {count} numbers, found {value!r}")
    return numbers


def _most_common(values: list):
    keys = [tuple(np.round(v, 4)) if isinstance(v, np.ndarray) else v for v in values]
    return values[keys.index(collections.Counter(keys).most_common(1)[0][0])]


def _positive_pixel_spacing(header: Dataset, name) -> np.ndarray:
    pixel_spacing = _floats(header, "PixelSpacing", name, 2)
    if np.any(pixel_spacing <= 0):
        raise ScanError(
            f"{name}: PixelSpacing {pixel_spacing.tolist()} must be two positive sizes in mm"
        )
    return pixel_spacing


def _orientation(header: Dataset, name) -> np.ndarray:
    """ImageOrientationPatient, which must be two perpendicular unit vectors (row, column)."""
    orientation = _floats(header, "ImageOrientationPatient", name, 6)
    row_direction, column_direction = orientation[:3], orientation[3:]
    unit = np.allclose(np.linalg.norm([row_direction, column_direction], axis=1), 1, atol=1e-3)
    if not unit or abs(row_direction @ column_direction) > 1e-3:
        raise ScanError(
            f"{name}: ImageOrientationPatient {orientation.tolist()} is not two perpendicular "
            "unit vectors; the header's geometry is damaged"
        )
    return orientation


def _refuse_tilt(step: np.ndarray, normal: np.ndarray, name: str) -> None:
    """Refuse slices that step sideways as well as along their normal (a tilted gantry).

    Such a grid is sheared: NIfTI's qform cannot hold it and ITK-based readers drop or change
    the shear, so carrying it into the outputs would place the enhanced scan elsewhere than
    its source. Resampling it onto a grid perpendicular to the slices is left to the tools made
    for it.
    """
    along = float(step @ normal)
    sideways = float(np.linalg.norm(step - along * normal))
    if sideways > _SLICE_STEP_TOLERANCE * abs(along) + 1e-3:
        tilt = np.degrees(np.arctan2(sideways, abs(along)))
        raise ScanError(
            f"{name}: consecutive slices are {abs(along):.4g} mm apart along the slice normal "
            f"but also shifted {sideways:.4g} mm within the slice plane, a tilted-gantry series "
            f"({tilt:.3g} degrees); it is not supported: resample it onto slices perpendicular "
            "to the stacking direction first (e.g. dcm2niix corrects gantry tilt)"
        )


def grid_problem(affine: np.ndarray) -> str | None:
    """What makes an affine impossible for a scan (non-finite, a zero-length axis, axes in one
    plane), or None when it is usable.

    Such a header (e.g. an all-zero sform) is a damaged file; accepting it would run a whole
    inference and fail only at the writers, or write outputs with no place in the patient.
    """
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        return "the voxel-to-mm affine holds NaN or infinite values"
    voxel_sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(voxel_sizes <= 1e-6):
        shown = " x ".join(f"{v:.4g}" for v in voxel_sizes)
        return (
            f"the voxel-to-mm affine gives voxel sizes {shown} mm; every size must be positive "
            "(the geometry is missing or damaged)"
        )
    if abs(np.linalg.det(affine[:3, :3])) <= 1e-6 * np.prod(voxel_sizes):
        return "the voxel-to-mm affine is singular (two voxel axes point the same way)"
    return None


def is_sheared(affine: np.ndarray) -> bool:
    """Whether the voxel axes are not perpendicular, which NIfTI's qform cannot express."""
    axes = np.asarray(affine, np.float64)[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0)
    return not np.allclose(axes.T @ axes, np.eye(3), atol=1e-4)


def dicom_geometry(
    headers: Sequence[Dataset], names: Sequence
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Slice order, affine `(i, j, k) -> LPS mm` and spacing `(z, y, x)` of one series.

    Raises ScanError when the slices do not form one regular volume: sizes, pixel spacings or
    orientations that differ, repeated positions (e.g. several time frames), missing slices.
    """
    sizes, pixel_spacings, orientations, positions = [], [], [], []
    for header, name in zip(headers, names, strict=True):
        if not header.get("Rows") or not header.get("Columns"):
            raise ScanError(f"{name}: Rows or Columns missing; the file may be truncated")
        sizes.append((int(header.Rows), int(header.Columns)))
        pixel_spacings.append(_positive_pixel_spacing(header, name))
        orientations.append(_orientation(header, name))
        positions.append(_floats(header, "ImagePositionPatient", name, 3))
    # Compare each slice with the most common value, so the message names the odd file out.
    size = _most_common(sizes)
    pixel_spacing = _most_common(pixel_spacings)
    orientation = _most_common(orientations)
    for k, name in enumerate(names):
        if sizes[k] != size:
            raise ScanError(
                f"{name}: slice size {sizes[k][0]}x{sizes[k][1]} differs from "
                f"{size[0]}x{size[1]} of the other slices; one series must have one slice size"
            )
        if not np.allclose(pixel_spacings[k], pixel_spacing, rtol=1e-4, atol=1e-6):
            raise ScanError(
                f"{name}: PixelSpacing {pixel_spacings[k].tolist()} differs from "
                f"{pixel_spacing.tolist()} of the other slices"
            )
        if not np.allclose(orientations[k], orientation, rtol=0, atol=1e-4):
            raise ScanError(
                f"{name}: ImageOrientationPatient {orientations[k].tolist()} differs from "
                f"{orientation.tolist()} of the other slices"
            )
    positions = np.asarray(positions)
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    along_normal = positions @ normal
    order = np.argsort(along_normal, kind="stable")
    positions, along_normal = positions[order], along_normal[order]
    if len(positions) > 1:
        gaps = np.diff(along_normal)
        if np.any(gaps < 1e-6):
            k = int(np.argmin(gaps))
            raise ScanError(
                f"{names[order[k]]} and {names[order[k + 1]]}: two slices at the same position "
                f"{positions[k].tolist()}; the series may hold several time frames or repeated "
                "slices, which a single volume cannot"
            )
        # Each step between neighbours must match the typical one: a missing slice doubles a
        # step, a stray in-plane offset bends the stack.
        steps = np.diff(positions, axis=0)
        typical_step = np.median(steps, axis=0)
        deviation = np.linalg.norm(steps - typical_step, axis=1)
        irregular = np.flatnonzero(
            deviation > _SLICE_STEP_TOLERANCE * np.linalg.norm(typical_step) + 1e-3
        )
        if irregular.size:
            k = int(irregular[0])
            raise ScanError(
                f"{names[order[k]]} and {names[order[k + 1]]}: neighbouring slices are "
                f"{np.linalg.norm(steps[k]):.4g} mm apart where the others are "
                f"{np.linalg.norm(typical_step):.4g} mm apart; slice positions are not evenly "
                "spaced (a slice may be missing)"
            )
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
        slice_spacing = float(step @ normal)
        _refuse_tilt(step, normal, f"{names[order[0]]} to {names[order[-1]]}")
    else:
        slice_spacing = abs(
            float(headers[0].get("SpacingBetweenSlices") or headers[0].get("SliceThickness") or 1)
        )
        step = normal * slice_spacing
    affine = np.eye(4)
    affine[:3, 0] = row_direction * pixel_spacing[1]
    affine[:3, 1] = column_direction * pixel_spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    return order, affine, (slice_spacing, float(pixel_spacing[0]), float(pixel_spacing[1]))


def affine_in(volume: Volume, space: str) -> np.ndarray:
    if volume.space not in ("LPS", "RAS"):
        raise ScanError(f"Volume.space must be 'LPS' or 'RAS', got {volume.space!r}")
    affine = np.asarray(volume.affine, np.float64)
    return affine if volume.space == space else LPS_TO_RAS @ affine


def grid_affine(volume: Volume) -> np.ndarray:
    """The LPS affine of the grid being written, `(i, j, k) -> mm`.

    When the in-plane size differs from the source headers while the volume still carries the
    source affine (e.g. a super-resolved volume made with `volume.replace(data=sr)`), the new
    grid covers the same field of view: pixel spacing scales by old/new size and the centre of
    the first pixel moves by half the change in spacing. A volume whose affine was updated by the
    caller is written with that affine as it is.
    """
    affine = affine_in(volume, "LPS").copy()
    _, rows, columns = volume.data.shape
    if not volume.headers:
        return affine
    source_size = (volume.headers[0].get("Rows"), volume.headers[0].get("Columns"))
    if source_size == (rows, columns):
        return affine
    try:
        _, source_affine, _ = dicom_geometry(
            volume.headers, [f"source header {k}" for k in range(len(volume.headers))]
        )
    except ScanError:
        return affine  # headers without usable geometry: the affine is all there is
    if not np.allclose(affine, source_affine, atol=1e-4):
        return affine
    old_columns_axis, old_rows_axis = affine[:3, 0].copy(), affine[:3, 1].copy()
    affine[:3, 0] = old_columns_axis * source_size[1] / columns
    affine[:3, 1] = old_rows_axis * source_size[0] / rows
    affine[:3, 3] += (affine[:3, 0] - old_columns_axis) / 2 + (affine[:3, 1] - old_rows_axis) / 2
    return affine
