"""Random 3D phantoms of spheres, rods, cold inserts and blobs: the physics without the anatomy.

A scanner-degradation task (`task.degradation="scanner"`) learns what a scanner's PSF and
reconstruction noise do to activity, and how to undo part of it. That is a property of the
scanner, not of brains: shapes of every size teach it without teaching one organ's look, and
they are what scanners are measured on. Each phantom is a true activity map (no PSF, no noise:
the task blurs and adds noise on the device) on a grid of `PIXEL_MM` voxels:

* a warm elliptical body along the axis, its uptake modulated by a smooth random field
  (±`BLOB_AMPLITUDE`), with smooth, random ends along the axis in some phantoms;
* hot spheres and ellipsoids from 2 to 20 mm radius at 1.5–10× the body's uptake, some inside
  a cold wall 1–2 mm thick (the glass of a fillable phantom);
* hot rods along the axis (2–8 mm radius) and cold inserts (spheres or rods, 0–50 % uptake).

Edges are partial volumes: every shape is drawn on a grid `SUPERSAMPLE`× finer and averaged, so
a voxel holds the activity it would hold in reality. The phantoms are written as NIfTI files
in Bq/mL (`phantom-000.nii.gz`, ...) into a data root like any user's, with a `split.json`,
generated on first use (`ensure_phantoms`), one folder per seed and version.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from petsr_jax.volume import Volume

VERSION = "1"
NAME = "phantoms"
PIXEL_MM = 2.0
SLICE_MM = 2.0
SIZE = 96  # in-plane voxels: a 192 mm field of view
DEPTH = 32  # slices: 64 mm along the axis
COUNT = 20
SPLIT = {"train": 16, "val": 2, "test": 2}
SUPERSAMPLE = 2
BLOB_AMPLITUDE = 0.25


def default_root(seed: int, count: int = COUNT) -> Path:
    """`$PETSR_DATA_DIR/phantoms<count>-seed<seed>-v<VERSION>`, else under `~/.cache/petsr_jax`."""
    base = os.environ.get("PETSR_DATA_DIR") or Path.home() / ".cache" / "petsr_jax"
    return Path(base) / f"{NAME}{count}-seed{seed}-v{VERSION}"


def _grid(shape, spacing):
    """Voxel-centre coordinates in mm, centred on the volume, on a `SUPERSAMPLE`× finer grid."""
    axes = []
    for n, step in zip(shape, spacing, strict=True):
        fine = n * SUPERSAMPLE
        axes.append((np.arange(fine) + 0.5) * step / SUPERSAMPLE - n * step / 2)
    return np.meshgrid(*axes, indexing="ij")


def _average(fine: np.ndarray) -> np.ndarray:
    """Area-average a fine grid down by `SUPERSAMPLE` along each axis (partial volumes)."""
    s = SUPERSAMPLE
    d, h, w = (n // s for n in fine.shape)
    return fine.reshape(d, s, h, s, w, s).mean(axis=(1, 3, 5))


def phantom(rng: np.random.Generator, shape=(DEPTH, SIZE, SIZE)) -> np.ndarray:
    """One random true activity map `[slices, H, W]`, relative to a body uptake of about 1."""
    z, y, x = _grid(shape, (SLICE_MM, PIXEL_MM, PIXEL_MM))
    steps = np.array([SLICE_MM, PIXEL_MM, PIXEL_MM]) / SUPERSAMPLE
    low = np.array([z[0, 0, 0], y[0, 0, 0], x[0, 0, 0]])
    half_width = shape[2] * PIXEL_MM / 2
    a = rng.uniform(0.55, 0.92) * half_width
    b = rng.uniform(0.45, 0.85) * half_width
    body = (x / a) ** 2 + (y / b) ** 2 <= 1.0
    if rng.random() < 0.3:  # an end of the body inside the field of view
        end = rng.uniform(-0.3, 0.3) * shape[0] * SLICE_MM
        body &= z * rng.choice([-1, 1]) <= end
    field = rng.standard_normal(tuple(n // 4 + 2 for n in shape))
    field = ndi.zoom(ndi.gaussian_filter(field, 1.0), 4 * SUPERSAMPLE, order=1)
    field = field[: z.shape[0], : z.shape[1], : z.shape[2]]
    field /= max(float(np.abs(field).max()), 1e-6)
    activity = np.where(body, 1.0 + BLOB_AMPLITUDE * field * rng.uniform(0.2, 1.0), 0.0)

    def inside_body(radius):
        for _ in range(50):
            c = (
                rng.uniform(-0.45, 0.45) * shape[0] * SLICE_MM,
                rng.uniform(-b + radius, b - radius) if b > radius else 0.0,
                rng.uniform(-a + radius, a - radius) if a > radius else 0.0,
            )
            if (c[2] / a) ** 2 + (c[1] / b) ** 2 <= 0.8:
                return c
        return (0.0, 0.0, 0.0)

    def box(centre, reach, rod=False):
        """Index slices of the fine grid within `reach` mm of `centre` (every slice for a rod)."""
        first = np.floor((np.asarray(centre) - reach - low) / steps).astype(int)
        last = np.ceil((np.asarray(centre) + reach - low) / steps).astype(int) + 1
        if rod:
            first[0], last[0] = 0, z.shape[0]
        return tuple(slice(max(f, 0), max(l_, 0)) for f, l_ in zip(first, last, strict=True))

    def paint(where, region, level):
        activity[where] = np.where(region, level, activity[where])

    for _ in range(rng.integers(2, 5)):  # cold inserts first: hot shapes may sit beside them
        radius = rng.uniform(5.0, 25.0)
        c = inside_body(radius)
        rod = rng.random() < 0.5  # a rod along the axis, or a sphere
        w = box(c, radius, rod)
        r2 = (x[w] - c[2]) ** 2 + (y[w] - c[1]) ** 2 + (0 if rod else (z[w] - c[0]) ** 2)
        paint(w, (r2 <= radius**2) & body[w], rng.uniform(0.0, 0.5))
    for _ in range(rng.integers(4, 12)):  # hot spheres and ellipsoids
        radius = float(np.exp(rng.uniform(np.log(2.0), np.log(20.0))))
        radii = radius * (rng.uniform(0.6, 1.4, 3) if rng.random() < 0.35 else np.ones(3))
        c = inside_body(radius)
        w = box(c, 1.3 * float(np.max(radii)) + 2.0)
        r2 = ((z[w] - c[0]) / radii[0]) ** 2 + ((y[w] - c[1]) / radii[1]) ** 2
        r2 += ((x[w] - c[2]) / radii[2]) ** 2
        if rng.random() < 0.4:  # a cold wall around it, as a fillable sphere's glass
            wall = rng.uniform(1.0, 2.0) / radius
            paint(w, (r2 <= (1 + wall) ** 2) & (r2 > 1), 0.0)
        paint(w, r2 <= 1, rng.uniform(1.5, 10.0))
    for _ in range(rng.integers(0, 4)):  # hot rods along the axis
        radius = rng.uniform(2.0, 8.0)
        c = inside_body(radius)
        w = box(c, radius, rod=True)
        region = (x[w] - c[2]) ** 2 + (y[w] - c[1]) ** 2 <= radius**2
        paint(w, region & body[w], rng.uniform(1.5, 6.0))
    return _average(activity).astype(np.float32)


def phantom_volume(index: int, seed: int = 0) -> Volume:
    """Phantom `index` of seed `seed` as a Volume in Bq/mL (body uptake 2–10 kBq/mL)."""
    rng = np.random.default_rng([seed, index])
    data = phantom(rng) * rng.uniform(2000.0, 10000.0)
    depth, size = data.shape[0], data.shape[1]
    affine = np.diag([PIXEL_MM, PIXEL_MM, SLICE_MM, 1.0])
    affine[:3, 3] = [
        -(size - 1) * PIXEL_MM / 2,
        -(size - 1) * PIXEL_MM / 2,
        -(depth - 1) * SLICE_MM / 2,
    ]
    return Volume(
        data=data.astype(np.float32),
        spacing=(SLICE_MM, PIXEL_MM, PIXEL_MM),
        units="BQML",
        patient_id=f"phantom-{index:03d}",
        affine=affine,
        space="LPS",
    )


def ensure_phantoms(
    seed: int = 0, *, root=None, count: int | None = None, progress: bool = True
) -> Path:
    """The data root of `count` phantoms of `seed`, generated on first use (seconds).

    Written into a temporary folder and renamed, so a root that exists is complete; its
    `phantoms.json` names the generator version and seed, checked on reuse.
    """
    from petsr_jax.io import write_nifti

    count = COUNT if count is None else int(count)
    root = default_root(seed, count) if root is None else Path(root)
    description = {"generator": NAME, "version": VERSION, "seed": seed, "count": count}
    if (root / "phantoms.json").is_file():
        found = json.loads((root / "phantoms.json").read_text())
        if found != description:
            raise ValueError(
                f"{root / 'phantoms.json'}: holds {found}, expected {description}; delete {root} "
                "to regenerate it"
            )
        return root
    partial = root.with_name(f"{root.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    try:
        ids = []
        iterator = range(count)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc=f"phantoms (seed {seed})", unit="phantom")
        for index in iterator:
            volume = phantom_volume(index, seed)
            write_nifti(volume, partial / f"{volume.patient_id}.nii.gz")
            ids.append(volume.patient_id)
        counts = _split_counts(count)
        split = {
            "train": ids[: counts[0]],
            "val": ids[counts[0] : counts[0] + counts[1]],
            "test": ids[counts[0] + counts[1] :],
        }
        (partial / "split.json").write_text(json.dumps(split, indent=1))
        (partial / "phantoms.json").write_text(json.dumps(description))
        try:
            os.replace(partial, root)
        except OSError:  # another process finished the same root first
            if not (root / "phantoms.json").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root


def _split_counts(count: int) -> tuple[int, int, int]:
    """Train/val/test counts: the default's proportions, at least one phantom in each."""
    val = max(1, round(count * SPLIT["val"] / COUNT))
    test = max(1, round(count * SPLIT["test"] / COUNT))
    return count - val - test, val, test
