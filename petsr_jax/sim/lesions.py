"""Hot and cold spherical lesions inside the brain: drawn per patient, inserted, labelled.

Lesions are what a super-resolution network must not smooth away or invent, so each patient
gets between `CohortSpec.lesions` (fewest, most) of them, of varied size (3–14 mm radius) and
contrast, hot (1.6–3.5×) or cold (0.15–0.6×) against their surroundings, placed deep enough that
the whole sphere is brain.
Their contrast is defined against the activity around them before insertion, so the recorded
`contrast` is exactly what the true activity map holds and recovery can be measured against it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from petsr_jax.sim.atlas import Atlas
from petsr_jax.sim.pose import Pose
from petsr_jax.sim.presets import CohortSpec, grid_axes
from petsr_jax.sim.shapes import occupancy


@dataclasses.dataclass(frozen=True)
class Lesion:
    label: int
    kind: str  # "hot" or "cold"
    radius_mm: float
    contrast: float  # lesion activity / mean activity of the shell r..2r around it
    centre_mm: tuple[float, float, float]  # world LPS


def draw_lesions(
    rng: np.random.Generator, spec: CohortSpec, pose: Pose, atlas: Atlas
) -> list[Lesion]:
    """Between `spec.lesions` (fewest, most) lesions at random brain sites (fewer where too few
    sites fit)."""
    fewest, most = spec.lesions
    count = int(rng.integers(min(fewest, most), most + 1)) if most > 0 else 0
    lesions: list[Lesion] = []
    for _ in range(50 * count):
        if len(lesions) == count:
            break
        radius = float(np.exp(rng.uniform(np.log(3.0), np.log(14.0))))
        site = int(rng.integers(len(atlas.lesion_sites)))
        centre = _placed_centre(radius, site, spec, pose, atlas, lesions)
        if centre is not None:
            lesions.append(_draw_lesion(rng, len(lesions) + 1, radius, centre))
    return lesions


def _placed_centre(radius, site, spec, pose, atlas, lesions) -> np.ndarray | None:
    """World centre of a lesion of `radius` at an atlas site, or None where it does not fit:
    too shallow, cut by the axial coverage, or too close to a lesion already placed."""
    # Deep enough that the whole sphere is brain (with the warp's few mm to spare).
    if atlas.lesion_depth_mm[site] < radius / min(pose.scale) + 3.0:
        return None
    centre = pose.to_world(atlas.lesion_sites[site])
    bottom, top = spec.z_range_mm
    if not bottom + radius <= centre[2] <= top - radius:
        return None
    if any(
        np.linalg.norm(centre - np.asarray(other.centre_mm)) < radius + other.radius_mm + 8
        for other in lesions
    ):
        return None
    return centre


def _draw_lesion(rng: np.random.Generator, label: int, radius: float, centre) -> Lesion:
    """A hot or cold lesion (even odds) with its contrast drawn."""
    hot = bool(rng.random() < 0.5)
    contrast = rng.uniform(1.6, 3.5) if hot else rng.uniform(0.15, 0.6)
    return Lesion(
        label=label,
        kind="hot" if hot else "cold",
        radius_mm=round(radius, 3),
        contrast=round(float(contrast), 4),
        centre_mm=tuple(round(float(c), 3) for c in centre),
    )


def _lesion_window(lesion: Lesion, spec: CohortSpec, size: int, reach: float):
    """The grid box within `reach` mm of a lesion centre and the distances (mm) inside it."""
    x, y, z = grid_axes(spec, size)
    cx, cy, cz = lesion.centre_mm
    ranges = []
    for axis, centre in ((z, cz), (y, cy), (x, cx)):
        inside = np.flatnonzero(np.abs(axis - centre) <= reach)
        ranges.append(slice(inside[0], inside[-1] + 1) if inside.size else slice(0, 0))
    dz, dy, dx = (
        (axis[r] - c) ** 2 for axis, r, c in zip((z, y, x), ranges, (cz, cy, cx), strict=True)
    )
    distance = np.sqrt(dz[:, None, None] + dy[None, :, None] + dx[None, None, :])
    return tuple(ranges), distance.astype(np.float32)


def insert_lesions(activity: np.ndarray, lesions: list[Lesion], spec: CohortSpec, size: int):
    """Lesion activity = contrast × the mean of the shell r..2r around it, measured before any
    lesion is inserted, so `contrast` is exactly the lesion-to-surroundings ratio."""
    edge = spec.fov_mm / size
    windows = [_lesion_window(lesion, spec, size, 2 * lesion.radius_mm + 2 * edge) for lesion
               in lesions]  # fmt: skip
    surrounds = []
    for lesion, (box, distance) in zip(lesions, windows, strict=True):
        shell = (distance > lesion.radius_mm + edge) & (distance <= 2 * lesion.radius_mm + edge)
        local = activity[box]
        surrounds.append(float(local[shell].mean()) if shell.any() else float(local.mean()))
    for lesion, (box, distance), surround in zip(lesions, windows, surrounds, strict=True):
        alpha = occupancy(distance - lesion.radius_mm, edge)
        activity[box] += alpha * (lesion.contrast * surround - activity[box])
    return activity


def lesion_map(lesions: list[Lesion], spec: CohortSpec) -> np.ndarray:
    """Lesion labels on the output grid: voxels whose centre lies inside a lesion."""
    labels = np.zeros((spec.n_slices, spec.size, spec.size), np.uint8)
    for lesion in lesions:
        box, distance = _lesion_window(lesion, spec, spec.size, lesion.radius_mm + spec.pixel_mm)
        labels[box][distance <= lesion.radius_mm] = lesion.label
    return labels
