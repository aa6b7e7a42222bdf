"""Where a patient's head sits and how it differs from the template: pose, size and warp.

Each patient gets its own head pose (rotations of a few degrees, a translation), size (global
and per-axis scale) and a smooth non-rigid deformation. The deformation and the smooth regional
variations elsewhere (metabolism, MR bias) are `SmoothField`s: sums of a few separable cosines,
cheap to evaluate on a whole grid. `template_coordinates` maps the scanner grid into the
template, so every map is drawn by sampling the template, never by resampling a drawn map.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SmoothField:
    """A smooth random field: a sum of separable cosines (wavelengths 70–220 mm), cheap to
    evaluate on a grid as outer products of 1D factors."""

    amplitudes: np.ndarray  # [modes]
    frequencies: np.ndarray  # [modes, 3] rad/mm for (x, y, z)
    phases: np.ndarray  # [modes, 3]

    @classmethod
    def draw(cls, rng: np.random.Generator, amplitude: float, modes: int = 4) -> SmoothField:
        wavelengths = rng.uniform(70.0, 220.0, size=(modes, 3))
        signs = rng.choice([-1.0, 1.0], size=(modes, 1))
        return cls(
            amplitudes=amplitude * signs[:, 0] * rng.uniform(0.5, 1.0, modes) / np.sqrt(modes),
            frequencies=2 * np.pi / wavelengths,
            phases=rng.uniform(0, 2 * np.pi, size=(modes, 3)),
        )

    def on_grid(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Values on the grid of 1D axes `z[:, None, None], y[None, :, None], x[None, None, :]`."""
        out = np.zeros((z.size, y.size, x.size), np.float32)
        for amplitude, (fx, fy, fz), (px, py, pz) in zip(
            self.amplitudes, self.frequencies, self.phases, strict=True
        ):
            out += (
                amplitude
                * np.cos(fz * z + pz)[:, None, None].astype(np.float32)
                * np.cos(fy * y + py)[None, :, None].astype(np.float32)
                * np.cos(fx * x + px)[None, None, :].astype(np.float32)
            )
        return out

    def at(self, point: np.ndarray) -> float:
        return float(
            np.sum(self.amplitudes * np.prod(np.cos(self.frequencies * point + self.phases), 1))
        )


@dataclasses.dataclass(frozen=True)
class Pose:
    """World (scanner, LPS mm) → template (MNI, RAS mm) for one patient.

    `template = flip(centre + inverse(rotation · scale) (world - centre - shift) + warp(world))`,
    with `flip` the LPS→RAS sign change and `warp` a smooth displacement (mm, per axis).
    """

    rotation_deg: tuple[float, float, float]
    scale: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    warp: tuple[SmoothField, SmoothField, SmoothField]
    centre: tuple[float, float, float] = (0.0, 8.0, -24.0)

    @property
    def matrix(self) -> np.ndarray:
        """The linear part world ← template (LPS), rotation · scale."""
        ax, ay, az = np.radians(self.rotation_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx @ np.diag(self.scale)

    def to_world(self, template_point: np.ndarray) -> np.ndarray:
        """World position (LPS) of an MNI point: the inverse map, solved by fixed point (the
        warp is a few mm and smooth, so three steps converge far below a voxel)."""
        lps = np.asarray(template_point, np.float64) * np.array([-1.0, -1.0, 1.0])
        centre, shift = np.asarray(self.centre), np.asarray(self.shift_mm)
        world = centre + shift + self.matrix @ (lps - centre)
        for _ in range(4):
            warp = np.array([field.at(world) for field in self.warp])
            world = centre + shift + self.matrix @ (lps - warp - centre)
        return world


def draw_pose(rng: np.random.Generator) -> Pose:
    size = rng.uniform(0.93, 1.05)
    return Pose(
        rotation_deg=tuple(rng.uniform(-6.0, 6.0, 3) * np.array([1.0, 0.6, 1.0])),
        scale=tuple(size * (1.0 + rng.uniform(-0.035, 0.035, 3))),
        shift_mm=tuple(rng.uniform(-5.0, 5.0, 3) * np.array([1.0, 1.0, 0.5])),
        warp=tuple(SmoothField.draw(rng, amplitude=3.0) for _ in range(3)),
    )


def template_coordinates(pose: Pose, x, y, z) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNI (RAS) coordinates of the world grid `z × y × x` (1D LPS axes)."""
    inverse = np.linalg.inv(pose.matrix).astype(np.float32)
    centre = np.asarray(pose.centre, np.float32)
    shift = np.asarray(pose.shift_mm, np.float32)
    rel = [
        (np.asarray(axis, np.float32) - c - s)
        for axis, c, s in zip((x, y, z), centre, shift, strict=True)
    ]
    shape = (len(z), len(y), len(x))
    coords = []
    for row, field, flip in zip(inverse, pose.warp, (-1.0, -1.0, 1.0), strict=True):
        value = (row[0] * rel[0][None, None, :] + row[1] * rel[1][None, :, None]) + row[2] * rel[2][
            :, None, None
        ]
        value = value + centre[len(coords)]
        coords.append(flip * (np.broadcast_to(value, shape) + field.on_grid(x, y, z)))
    return tuple(coords)
