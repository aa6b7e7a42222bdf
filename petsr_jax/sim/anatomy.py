"""One patient's head as maps: FDG uptake, attenuation, T1 intensity, tissue labels.

Each voxel of the scanner grid is mapped into the MNI template (`petsr_jax.sim.pose`), where the
brain comes from the template maps (`petsr_jax.sim.atlas`) and everything around it from shells
at fixed distances outside the intracranial volume (a CSF rim, a 6 mm skull, a 6 mm scalp) and
analytic shapes below the cranium (`petsr_jax.sim.shapes`). Tissues are painted outermost first,
each blending over the previous by its partial volume, and the brain last. Uptakes are relative
to grey matter (grey:white near 4, `petsr_jax.sim.tissues`), and grey matter carries a smooth
regional metabolic variation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from petsr_jax.sim.atlas import Atlas, load_atlas, trilinear
from petsr_jax.sim.pose import Pose, SmoothField, template_coordinates
from petsr_jax.sim.presets import CohortSpec, grid_axes
from petsr_jax.sim.shapes import (
    CSF_RIM_MM,
    FACE_AND_NECK,
    FACE_AND_NECK_INNER,
    LOWER_HEAD,
    NOSE,
    SCALP_OUTER_MM,
    SKULL_OUTER_MM,
    full_occupancy,
    occupancy,
    shape_occupancy,
)
from petsr_jax.sim.tissues import MU_SOFT_TISSUE_PER_CM, TISSUES

# Every structure lies inside this box-like super-ellipse of MNI x, y (mm); points outside it
# are air and skip the per-point work (about half of a 300 mm field of view).
_HEAD_HALF_WIDTH_MM, _HEAD_HALF_DEPTH_MM, _HEAD_CENTRE_Y_MM = 96.0, 122.0, -7.0


@dataclasses.dataclass
class Anatomy:
    """Maps of one patient on one grid `[slices, size, size]`."""

    uptake: np.ndarray  # FDG uptake relative to grey matter (lesions not yet included)
    mu_per_cm: np.ndarray
    t1: np.ndarray
    labels: np.ndarray  # uint8 codes of LABELS
    brain: np.ndarray  # brain occupancy 0..1
    grey: np.ndarray  # grey-matter fraction
    white: np.ndarray  # white-matter fraction

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> Anatomy:
        def zeros(dtype=np.float32):
            return np.zeros(shape, dtype)

        return cls(zeros(), zeros(), zeros(), zeros(np.uint8), zeros(), zeros(), zeros())

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (
            self.uptake,
            self.mu_per_cm,
            self.t1,
            self.labels,
            self.brain,
            self.grey,
            self.white,
        )


def anatomy(
    pose: Pose,
    uptakes: dict[str, float],
    metabolism: SmoothField,
    spec: CohortSpec,
    size: int,
    *,
    chunk: int = 4,
) -> Anatomy:
    """A patient's head on a `size`² grid of `spec`'s slices (see module docstring).

    Drawn `chunk` slices at a time, and only at the points inside the head's bounding shape.
    """
    atlas = load_atlas()
    x, y, z = grid_axes(spec, size)
    edge = spec.fov_mm / size
    out = Anatomy.empty((len(z), size, size))
    for start in range(0, len(z), chunk):
        zs = z[start : start + chunk]
        tx, ty, tz = template_coordinates(pose, x, y, zs)
        where = np.flatnonzero(_head_candidates(tx, ty))
        if where.size == 0:
            continue
        grey_uptake = uptakes["grey"] * (1.0 + metabolism.on_grid(x, y, zs).ravel()[where])
        points = (tx.ravel()[where], ty.ravel()[where], tz.ravel()[where])
        values = _paint_head(*points, atlas, uptakes, grey_uptake, edge)
        for target, value in zip(out.arrays(), values, strict=True):
            target[start : start + len(zs)].reshape(-1)[where] = value
    return out


def _head_candidates(tx: np.ndarray, ty: np.ndarray) -> np.ndarray:
    return (np.abs(tx) / _HEAD_HALF_WIDTH_MM) ** 4 + (
        np.abs(ty - _HEAD_CENTRE_Y_MM) / _HEAD_HALF_DEPTH_MM
    ) ** 4 <= 1.0


class _Canvas:
    """Uptake, μ, T1 and label maps at a set of points, painted one tissue over another."""

    def __init__(self, n_points: int, uptakes: dict[str, float]):
        self.activity = np.zeros(n_points, np.float32)
        self.mu = np.zeros(n_points, np.float32)
        self.t1 = np.zeros(n_points, np.float32)
        self.labels = np.zeros(n_points, np.uint8)
        self.uptakes = uptakes

    def paint(self, alpha, name: str, where: np.ndarray | None = None) -> None:
        """Blend tissue `name` over the maps with partial-volume fraction `alpha` (at the points
        `where`, alpha's positions, if given; the others have none of the tissue)."""
        tissue, uptake = TISSUES[name], self.uptakes[name]
        values = (uptake, tissue.mu_per_cm, tissue.t1)
        if where is not None:
            for target, value in zip((self.activity, self.mu, self.t1), values, strict=True):
                old = target[where]
                target[where] = old + alpha * (value - old)
            self.labels[where[alpha >= 0.5]] = tissue.label
            return
        self.activity += alpha * (uptake - self.activity)
        self.mu += alpha * (tissue.mu_per_cm - self.mu)
        self.t1 += alpha * (tissue.t1 - self.t1)
        self.labels[alpha >= 0.5] = tissue.label


def _paint_head(tx, ty, tz, atlas: Atlas, uptakes: dict[str, float], grey_uptake, edge: float):
    """Uptake, μ, T1, label, brain, grey and white maps at MNI points (1D arrays)."""
    brain, grey, white, t1_brain, icv_distance = trilinear(atlas, tx, ty, tz).T
    canvas = _Canvas(tx.shape[0], uptakes)
    _paint_around_brain(canvas, (tx, ty, tz), icv_distance, edge)
    _paint_brain(canvas, brain, grey, white, t1_brain, grey_uptake)
    return canvas.activity, canvas.mu, canvas.t1, canvas.labels, brain, grey, white


def _paint_around_brain(canvas: _Canvas, points, icv_distance, edge: float) -> None:
    """Skin and subcutaneous fat over the cranium, face and neck, deeper soft tissue inside,
    the skull, the structures below the cranium, and the CSF rim around the brain."""
    cranium = occupancy(icv_distance - SCALP_OUTER_MM, edge)
    face = full_occupancy(FACE_AND_NECK, *points, edge)
    canvas.paint(cranium if face is None else np.maximum(cranium, face), "scalp")
    nose = full_occupancy(NOSE, *points, edge)
    if nose is not None:
        canvas.paint(nose, "soft")
    skull = occupancy(icv_distance - SKULL_OUTER_MM, edge)
    inner = full_occupancy(FACE_AND_NECK_INNER, *points, edge)
    if inner is not None:
        canvas.paint(inner * (1.0 - skull), "soft")
    inside_rim = occupancy(icv_distance - CSF_RIM_MM, edge)
    canvas.paint(np.clip(skull - inside_rim, 0.0, 1.0), "bone")
    _paint_lower_head(canvas, points, icv_distance, skull, 1.0 - inside_rim, edge)
    canvas.paint(inside_rim, "csf")


def _paint_lower_head(canvas: _Canvas, points, icv_distance, skull, outside_cavity, edge: float):
    """The analytic structures of `LOWER_HEAD`, in order, kept out of the cranial cavity."""
    for shape in LOWER_HEAD:
        found = shape_occupancy(shape, *points, edge)
        if found is None:
            continue
        where, alpha = found
        at = slice(None) if where is None else where
        if shape.tissue == "temporalis":
            # Only between the skull and the skin of the temple.
            alpha = alpha * (1.0 - skull[at])
            alpha = alpha * occupancy(icv_distance[at] - SCALP_OUTER_MM + 2, edge)
        canvas.paint(alpha * outside_cavity[at], shape.tissue, where)


def _paint_brain(canvas: _Canvas, brain, grey, white, t1_brain, grey_uptake) -> None:
    """The brain over everything else: the template's tissue fractions, grey matter with its
    regional variation, and a brain label where the brain fills most of a voxel."""
    csf = np.clip(brain - grey - white, 0.0, None)
    canvas.activity *= 1.0 - brain
    canvas.activity += (
        grey * grey_uptake + white * canvas.uptakes["white"] + csf * canvas.uptakes["csf"]
    )
    canvas.mu += brain * (MU_SOFT_TISSUE_PER_CM - canvas.mu)
    canvas.t1 *= 1.0 - brain
    canvas.t1 += t1_brain
    brain_label = np.where(grey >= white, 1, 2).astype(np.uint8)
    brain_label[(csf > grey) & (csf > white)] = 3
    in_brain = brain >= 0.5
    canvas.labels[in_brain] = brain_label[in_brain]
