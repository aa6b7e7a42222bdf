"""The analytic head outside the brain: shells around the cranium and shapes below it.

The MNI template holds a brain only. A real head scan also holds the scalp and skull (shells at
fixed distances outside the intracranial volume, `*_MM` below) and, in its lower slices,
everything below and in front of the cranium: orbits, eyes and their hot extraocular muscles,
nose and nasal cavity, maxillary sinuses, palate, teeth, tongue, tonsils, mandible, masseter
and pterygoid muscles, parotid and submandibular glands, cervical spine, spinal cord, airway and
neck. Those are drawn from analytic shapes placed in MNI millimetres, so the lower slices reach
the skull base and the jaw as a real head scan does. Edges are partial volumes (`occupancy`), so
a shape drawn on a fine grid averages to the right fractions on a coarse one.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Shells outside the intracranial volume, by distance from it (mm).
CSF_RIM_MM = 1.5
SKULL_OUTER_MM = 7.5
SCALP_OUTER_MM = 13.5
SUBCUTANEOUS_MM = 8.0  # fat layer under the skin of the face and neck


@dataclasses.dataclass(frozen=True)
class Shape:
    """An analytic structure in MNI millimetres (RAS: x right, y anterior, z superior).

    kind "ellipsoid": `centre`, `radii`.
    kind "tube": an axial stack of super-ellipses; `knots` rows are (z, cx, cy, a, b) and are
      interpolated linearly in z; `power` 2 is an ellipse, larger is boxier.
    kind "arc": a U-shaped band `y = y0 - k x²` for |x| ≤ x_max (dental arches, mandible) of
      half-thickness `half_thickness`, between z = `z_low + z_rise (x / x_max)²` and `z_high`.
    `mirror` adds the copy at -x (paired organs).
    """

    tissue: str
    kind: str
    centre: tuple[float, ...] = ()
    radii: tuple[float, ...] = ()
    knots: tuple[tuple[float, ...], ...] = ()
    power: float = 2.0
    arc: tuple[float, ...] = ()  # (y0, k, x_max, half_thickness, z_low, z_rise, z_high)
    mirror: bool = False

    def z_extent(self) -> tuple[float, float]:
        if self.kind == "ellipsoid":
            return self.centre[2] - self.radii[2], self.centre[2] + self.radii[2]
        if self.kind == "tube":
            return self.knots[0][0], self.knots[-1][0]
        return self.arc[4], self.arc[6]


def _tube(tissue, knots, power=2.0, mirror=False) -> Shape:
    return Shape(tissue, "tube", knots=tuple(tuple(map(float, k)) for k in knots), power=power,
                 mirror=mirror)  # fmt: skip


def _ellipsoid(tissue, centre, radii, mirror=False) -> Shape:
    return Shape(tissue, "ellipsoid", centre=tuple(centre), radii=tuple(radii), mirror=mirror)


def _arc(tissue, y0, x_max, y_end, half_thickness, z_low, z_rise, z_high) -> Shape:
    curvature = (y0 - y_end) / x_max**2
    return Shape(tissue, "arc", arc=(y0, curvature, x_max, half_thickness, z_low, z_rise, z_high))


# Outer envelope of the face and neck below the cranium: (z, cx, cy, half-width, half-depth).
# Front and back edges follow adult head profiles (forehead, cheeks, lips, chin at z ≈ -142,
# then the neck); the cranium above is the scalp shell around the brain.
FACE_AND_NECK = _tube(
    "scalp",
    [
        (z, 0.0, (front + back) / 2, half_width, (front - back) / 2)
        for z, front, back, half_width in [
            (-170, 25, -66, 54),
            (-150, 30, -68, 54),
            (-142, 58, -70, 55),
            (-130, 80, -72, 58),
            (-110, 86, -75, 62),
            (-90, 86, -78, 66),
            (-70, 82, -85, 68),
            (-50, 78, -95, 72),
            (-30, 76, -100, 75),
            (-10, 80, -106, 76),
            (0, 80, -106, 76),
        ]
    ],
    power=2.4,
)
NOSE = _tube(
    "soft",
    [(-90, 0, 84, 9, 4), (-80, 0, 90, 15, 10), (-70, 0, 94, 14, 12), (-55, 0, 90, 10, 10),
     (-40, 0, 86, 7, 7), (-28, 0, 82, 6, 5)],
)  # fmt: skip


# The face and neck under their subcutaneous fat layer.
FACE_AND_NECK_INNER = _tube(
    "soft",
    [(z, cx, cy, a - SUBCUTANEOUS_MM, b - SUBCUTANEOUS_MM) for z, cx, cy, a, b in
     FACE_AND_NECK.knots],
    power=FACE_AND_NECK.power,
)  # fmt: skip


# Painted in order, each over the previous (partial volumes blend).
LOWER_HEAD: tuple[Shape, ...] = (
    # Temporal fossa muscle between skull and scalp.
    _ellipsoid("temporalis", (62, 8, -5), (16, 38, 38), mirror=True),
    # Neck and jaw muscles, glands.
    _ellipsoid("muscle", (20, -62, -125), (17, 17, 45), mirror=True),
    _ellipsoid("muscle", (56, 4, -100), (7, 17, 26), mirror=True),  # masseter
    _ellipsoid("muscle", (38, 0, -98), (7, 14, 20), mirror=True),  # medial pterygoid
    _ellipsoid("gland", (48, -20, -88), (11, 14, 22), mirror=True),  # parotid
    _ellipsoid("gland", (34, 20, -132), (10, 13, 9), mirror=True),  # submandibular
    _ellipsoid("tongue", (0, 40, -110), (24, 32, 16)),
    # Cervical spine: vertebrae, marrow of the bodies, canal, cord.
    _tube(
        "bone",
        [
            (-175, 0, -26, 18, 25),
            (-120, 0, -25, 18, 25),
            (-90, 0, -27, 22, 24),
            (-74, 0, -32, 24, 20),
        ],
    ),  # fmt: skip
    _tube("marrow", [(-175, 0, -14, 10, 9), (-90, 0, -14, 10, 9), (-80, 0, -18, 5, 5)]),
    _tube("csf", [(-175, 0, -40, 9, 8), (-100, 0, -42, 9, 8), (-70, 0, -45, 10, 9)]),
    _tube("cord", [(-175, 0, -40, 5, 4.5), (-100, 0, -42, 5, 4.5), (-70, 0, -45, 6, 5)]),
    # Airway from the nasopharynx down the neck, tonsils beside it.
    _tube(
        "air",
        [
            (-175, 0, 6, 9, 6),
            (-140, 0, 5, 10, 6),
            (-120, 0, 8, 12, 7),
            (-100, 0, 12, 13, 7),
            (-88, 0, 20, 12, 8),
            (-72, 0, 28, 10, 7),
        ],
    ),  # fmt: skip
    _ellipsoid("tonsil", (13, 10, -108), (6, 7, 9), mirror=True),
    # Nasal cavity (mucosa lining, air, septum) and maxillary sinuses.
    _tube(
        "mucosa",
        [(-88, 0, 55, 15, 30), (-60, 0, 55, 14, 30), (-40, 0, 57, 9, 26), (-28, 0, 58, 5, 20)],
    ),  # fmt: skip
    _tube(
        "air",
        [(-86, 0, 56, 12, 26), (-60, 0, 56, 11, 26), (-40, 0, 58, 6, 22), (-31, 0, 58, 2, 16)],
    ),  # fmt: skip
    _tube("mucosa", [(-86, 0, 55, 1.5, 26), (-31, 0, 58, 1.5, 18)]),
    _ellipsoid("mucosa", (29, 52, -62), (13, 17, 17), mirror=True),
    _ellipsoid("air", (29, 52, -62), (10.5, 14.5, 14.5), mirror=True),
    _ellipsoid("mucosa", (0, 72, 8), (12, 5, 9)),  # frontal sinus, inside the frontal bone
    _ellipsoid("air", (0, 72, 8), (10, 3.2, 7)),
    # Palate, teeth, mandible (body with marrow, rami).
    _tube("bone", [(-87, 0, 48, 20, 28), (-82, 0, 48, 20, 28)]),
    _arc("bone", 78, 31, 40, 5.0, -96, 0, -87),  # upper teeth
    _arc("bone", 76, 31, 40, 5.0, -106, 0, -97),  # lower teeth
    _arc("bone", 80, 48, -5, 5.5, -143, 14, -105),  # mandible body
    _arc("marrow", 80, 46, -5, 2.5, -139, 14, -109),
    _tube(
        "bone",
        [(-130, 48, -4, 4, 12), (-100, 50, -2, 4, 14), (-75, 51, -6, 4, 12), (-58, 50, -12, 5, 6)],
        mirror=True,
    ),  # fmt: skip
    # Orbits: fat, the four recti (hot in FDG), the globe.
    _ellipsoid("orbital_fat", (30, 48, -36), (15, 22, 14), mirror=True),
    _ellipsoid("eye_muscle", (44, 44, -36), (3, 15, 4), mirror=True),
    _ellipsoid("eye_muscle", (19, 44, -36), (3, 15, 4), mirror=True),
    _ellipsoid("eye_muscle", (31, 44, -25.5), (5, 15, 3), mirror=True),
    _ellipsoid("eye_muscle", (31, 44, -46.5), (5, 15, 3), mirror=True),
    _ellipsoid("eye", (32, 60, -36), (12, 12, 12), mirror=True),
)


def occupancy(signed_distance: np.ndarray, edge_mm: float) -> np.ndarray:
    """Fraction of a voxel inside a surface, from the signed distance (mm, negative inside).

    A linear ramp one voxel wide is the area fraction of a voxel cut by a straight edge.
    """
    return np.clip(0.5 - signed_distance / edge_mm, 0.0, 1.0, dtype=np.float32)


def _shape_box(shape: Shape, edge_mm: float) -> tuple[tuple[float, float], ...] | None:
    """MNI `((x0, x1), (y0, y1), (z0, z1))` outside which `shape` (and its mirror copy) has no
    occupancy at all on a grid of `edge_mm` voxels; None where no simple box is worked out.

    Outside a box stretched by `edge_mm / smallest radius` the signed distance is at least one
    voxel (twice the half voxel where `occupancy` reaches 0), so skipping those points changes
    nothing: a painted structure costs its own extent, not the whole slab.
    """
    if shape.kind == "ellipsoid":
        (cx, cy, cz), radii = shape.centre, shape.radii
        stretch = 1.0 + edge_mm / min(radii)
        rx, ry, rz = (r * stretch for r in radii)
        x0, x1, y0, y1, z0, z1 = cx - rx, cx + rx, cy - ry, cy + ry, cz - rz, cz + rz
    elif shape.kind == "tube":
        # Centres and half-axes are linear in z between knots, so the knots bound them.
        knots = np.asarray(shape.knots, np.float64)
        z, cx, cy, a, b = knots.T
        stretch = 1.0 + edge_mm / float(np.minimum(a, b).min())
        x0, x1 = float((cx - a * stretch).min()), float((cx + a * stretch).max())
        y0, y1 = float((cy - b * stretch).min()), float((cy + b * stretch).max())
        z0, z1 = float(z[0]) - edge_mm, float(z[-1]) + edge_mm
    else:
        return None
    if shape.mirror:
        x0, x1 = min(x0, -x1), max(x1, -x0)
    return (x0, x1), (y0, y1), (z0, z1)


def _shape_distance(shape: Shape, x, y, z, sign: float = 1.0) -> np.ndarray:
    """Approximate signed distance (mm) from points to `shape` (its mirror copy if sign=-1)."""
    if shape.kind == "ellipsoid":
        cx, cy, cz = shape.centre
        ra, rb, rc = shape.radii
        rho = np.sqrt(((x - sign * cx) / ra) ** 2 + ((y - cy) / rb) ** 2 + ((z - cz) / rc) ** 2)
        return (rho - 1.0) * min(shape.radii)
    if shape.kind == "tube":
        knots = np.asarray(shape.knots, np.float32)
        zs = knots[:, 0]
        cx, cy, a, b = (np.interp(z, zs, knots[:, j]).astype(np.float32) for j in range(1, 5))
        p = shape.power
        rho = (np.abs((x - sign * cx) / a) ** p + np.abs((y - cy) / b) ** p) ** (1.0 / p)
        in_plane = (rho - 1.0) * np.minimum(a, b)
        axial = np.maximum(zs[0] - z, z - zs[-1])
        return np.maximum(in_plane, axial)
    y0, k, x_max, half, z_low, z_rise, z_high = shape.arc
    across = np.abs(y - (y0 - k * x * x)) / np.sqrt(1.0 + (2.0 * k * x) ** 2) - half
    along = np.abs(x) - x_max
    axial = np.maximum(z_low + z_rise * (x / x_max) ** 2 - z, z - z_high)
    return np.maximum(np.maximum(across, along), axial)


def shape_occupancy(shape: Shape, tx, ty, tz, edge_mm: float):
    """`(where, alpha)`: the occupancy of `shape` at the MNI points `tx, ty, tz` (1D), given at
    the points `where` (None: at all of them); None where the shape reaches none of them."""
    low, high = shape.z_extent()
    if high < float(tz.min()) - edge_mm or low > float(tz.max()) + edge_mm:
        return None
    where, x, y, z = None, tx, ty, tz
    box = _shape_box(shape, edge_mm)
    if box is not None:
        (x0, x1), (y0, y1), (z0, z1) = box
        inside = (tx >= x0) & (tx <= x1) & (ty >= y0) & (ty <= y1) & (tz >= z0) & (tz <= z1)
        where = np.flatnonzero(inside)
        if where.size == 0:
            return None
        x, y, z = tx[where], ty[where], tz[where]
    alpha = occupancy(_shape_distance(shape, x, y, z), edge_mm)
    if shape.mirror:
        mirrored = _shape_distance(shape, x, y, z, sign=-1.0)
        alpha = np.maximum(alpha, occupancy(mirrored, edge_mm))
    return where, alpha


def full_occupancy(shape: Shape, tx, ty, tz, edge_mm: float) -> np.ndarray | None:
    """The occupancy of `shape` at every one of the points, or None where it reaches none."""
    found = shape_occupancy(shape, tx, ty, tz, edge_mm)
    if found is None or found[0] is None:
        return None if found is None else found[1]
    alpha = np.zeros(tx.shape, np.float32)
    alpha[found[0]] = found[1]
    return alpha
