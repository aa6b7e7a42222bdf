"""The embedded synthetic FDG-PET brain cohort: the project's default data.

The paper's 33-patient brain FDG-PET data are private, so the project ships a generator for a
cohort that looks and is stored like real scans: one PET DICOM series per patient (16-bit with a
per-slice RescaleSlope, Bq/mL) plus a co-registered T1, brain mask, tissue labels and lesion
labels as NIfTI on the PET grid. It is written once, deterministically from a seed, into a cache
folder in the layout users bring their own data in, so the default path runs the real reader:

    <root>/<patient_id>/              PET DICOM series (petsr_jax.io.read_volume)
    <root>/masks/<patient_id>.nii.gz  brain mask, uint8
    <root>/t1/<patient_id>.nii.gz     T1 MR on the PET grid, float32
    <root>/labels/<patient_id>.nii.gz tissue labels, uint8 (codes in `LABELS`)
    <root>/lesions/<patient_id>.nii.gz lesion labels 1..K, uint8 (facts in cohort.json)
    <root>/cohort.json                generator, version, preset, seed, sizes, per-patient facts

Anatomy. The brain comes from the MNI152 2009a maps bundled inside nilearn (no download): the
grey- and white-matter probability maps and the skull-stripped T1. The mask of that T1, closed,
is the intracranial volume; a CSF rim, a 6 mm skull and a 6 mm scalp are shells at fixed
distances outside it. Everything below and in front of the cranium (orbits, eyes and their hot
extraocular muscles, nose and nasal cavity, maxillary sinuses, palate, teeth, tongue, tonsils,
mandible, masseter and pterygoid muscles, parotid and submandibular glands, cervical spine,
spinal cord, airway, neck) is drawn from analytic shapes placed in MNI millimetres, so the lower
slices reach the skull base and the jaw as a real head scan does. Each patient gets its own head
pose (rotations of a few degrees, translation), size (global and per-axis scale), a smooth
non-rigid deformation, a grey:white uptake ratio near 4, a patient-level uptake scale (grey
matter 8–15 kBq/mL), per-tissue uptake variation, a smooth regional metabolic variation, and
hot and cold spherical lesions of varied size and contrast inside the brain.

Geometry (why these numbers). The paper's scanner, a GE Signa PET/MR, reconstructs 89 slices of
2.78 mm (its 25 cm axial field of view); 89 × 2.78 mm = 247 mm is exactly vertex-to-chin of an
adult head, which is what "from the skull down to the lower jaw" describes, so the default grid
spans MNI z = -146..+101 mm. The paper's "4 mm at 384²" would be a 1.5 m field of view, not a
brain scan. Brain protocols reconstruct a 25–30 cm field of view; the paper preset takes 260 mm
(0.68 mm pixels at 384²), the smallest that keeps every head of the default (seed 0) cohort
inside the reconstructed circle (its farthest scalp is 130 mm from the centre), as a
technologist sets a brain field of view around the head. How much of a slice the head fills
matters to the paper's metrics, which are means over whole slices where the air scores
perfectly: at 300 mm the head covered about a quarter of each brain slice and the bicubic SSIM
came out far above the paper's (`launch/cohort_difficulty.py` measures it). The small and tiny
presets keep 300 mm. Orientation is standard axial DICOM (LPS: columns toward the patient's
left, rows toward posterior, slices from the jaw up).

PET simulation (why it is fast enough; see `petsr_jax.sim.scanner`). The true activity is built on a
fine grid (≤ 1.2 mm pixels, 0.68 mm for the paper preset), blurred by the scanner PSF (4.5 mm
FWHM in-plane and axially), and area-averaged onto the acquisition grid (192² at 1.35 mm for the
paper preset: a scanner's detector sampling is coarser than its display matrix). One sparse
projector with fewer angles than a full 384² sinogram (168 views for 192 bins) is shared by
every slice of every patient and applied to all slices of a patient in one sparse × dense
product. Attenuation (μ from the anatomy: 0.096/cm soft tissue, 0.17/cm bone, 0 in air),
detector normalisation and the count calibration are per-bin factors; scatter (a broad
convolution of the attenuated trues, 30–40 % of prompts) and randoms (uniform) are an additive
term. Counts are Poisson at a per-patient level and reconstructed by PSF-OSEM (the model PSF is
4 mm, slightly under the true 4.5 mm, as clinical PSF models are), with no post-filter, then
interpolated (cubic) to the output matrix as a scanner's display matrix does. The paper-size
cohort takes minutes on two cores instead of the 13 hours a rotate-and-sum projector would.

The paper preset's reconstruction follows the paper's (OSEM with TOF and PSF, 13 iterations × 8
subsets, no post-filter), within what a 2D non-TOF simulation can do:
- Updates. 13 × 8 = 104 TOF updates. Time of flight localises each event along its line, so a
  TOF reconstruction reaches a given contrast recovery in fewer updates than a non-TOF one; the
  simulation runs about twice as many non-TOF updates, 4 iterations × 56 subsets of 3 views
  (224). For the same number of updates this costs half of 8 × 28 and gives the same images'
  bicubic metrics (measured on 6 patients, within 0.05 dB and 0.001 SSIM).
- Noise. The Signa PET/MR's coincidence timing resolution (about 390 ps) localises events to
  about 6 cm along a head of about 18–20 cm, which lowers the image variance about threefold:
  the simulated non-TOF data hold `tof_gain` = 3 × the patient's counts (`counts_per_slice`,
  0.6–5 M true counts per 2.78 mm slice, is still what cohort.json records).
- Axial resolution. The scanner's PSF model is 3D, so it recovers resolution across slices as
  well as in-plane; a slice-by-slice reconstruction cannot, and a full 4.5 mm axial blur left
  every slice smoother than a 3D PSF reconstruction's. The paper preset blurs across slices only
  by what the 4 mm model leaves, sqrt(4.5² − 4²) = 2.1 mm (`axial_psf_modelled`).
The small and tiny presets keep the earlier, cheaper protocol (3 iterations of 6-view subsets,
full axial blur, no TOF gain), so their data are unchanged. Measured with
`launch/cohort_difficulty.py` (PIL bicubic, scikit-image metrics, the 49 largest-brain slices of
each patient), the paper cohort's bicubic baseline over all 33 patients is 29.7 / 26.0 / 24.1 dB
PSNR and SSIM 0.91 / 0.83 / 0.78 at 8× / 12× / 16×, against the paper's 30.53 / 25.97 / 22.80 dB
and 0.889 / 0.796 / 0.699 (before these changes: 32.2 / 28.3 / 26.3 dB and 0.94 / 0.88 /
0.85). The 16× SSIM stays above the paper's: SSIM is ≈ 1 over the air, and the
head (39 % of a brain slice here) would have to score about 0.3 instead of 0.5 at 16×, or fill
over half the slice; neither noise, sharper reconstructions nor a smaller field of view
(measured down to 240 mm: 0.76) closed that gap.

Storage. `write_patient` hands the PET to `petsr_jax.io.write_dicom` (16-bit, one slope per
slice) and the T1 to `petsr_jax.io.write_nifti`; the integer maps are written as uint8 NIfTI with
the same axis mapping and affine, so `io.read_nifti_array` indexes them like the PET. A cohort is
generated into a hidden sibling folder and renamed into place only when complete, with
cohort.json written last: an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from petsr_jax.sim import scanner

GENERATOR = "petsr_jax.cohort"
VERSION = "2"

# Tissue label codes of labels/<patient_id>.nii.gz.
LABELS = {
    0: "background and air (outside the head, sinuses, airway)",
    1: "grey matter",
    2: "white matter",
    3: "cerebrospinal fluid",
    4: "other soft tissue (scalp, muscle, glands, eyes, spinal cord)",
    5: "bone (skull, mandible, teeth, spine)",
}

# Attenuation coefficients at 511 keV, 1/cm.
MU_SOFT_TISSUE_PER_CM = 0.096
MU_BONE_PER_CM = 0.17

# The Signa PET/MR slice thickness the default axial coverage is built from (see docstring).
REFERENCE_SLICE_MM = 2.78

DEFAULT_ROOT_ENV = "PETSR_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class CohortSpec:
    """Sizes and acquisition settings of a synthetic cohort.

    Attributes:
      n_patients: number of patients (ids `sub-001`, ...).
      n_slices: axial slices covering `z_range_mm`.
      size: output matrix (rows = columns) of every stored map.
      recon_size: OSEM matrix; the PET is interpolated from it to `size`.
      n_angles: projection views over 180°.
      fov_mm: in-plane field of view (square), mm.
      z_range_mm: (bottom, top) of the axial coverage in MNI mm (before each patient's pose).
      n_iterations, n_subsets: OSEM settings.
      scanner_psf_fwhm_mm: true system resolution applied to the data.
      recon_psf_fwhm_mm: resolution model inside OSEM.
      counts_per_slice: (low, high) expected true counts of a 2.78 mm slice; each patient draws
        a level log-uniformly (scaled with slice thickness).
      max_lesions: each patient gets 1..max_lesions lesions (0 gives none).
      axial_psf_modelled: the scanner's reconstruction models the PSF in 3D (axially too). The
        simulation reconstructs slice by slice, so it then blurs the data across slices only by
        the part of the PSF the model leaves, sqrt(scanner² − model²); False blurs by the whole
        scanner PSF, as a 2D reconstruction would leave it.
      tof_gain: noise-equivalent count gain of time of flight. The simulated data are non-TOF,
        so a TOF scanner's noise is reached with `tof_gain` × the counts (see docstring).
    """

    n_patients: int
    n_slices: int
    size: int
    recon_size: int
    n_angles: int
    fov_mm: float = 300.0
    z_range_mm: tuple[float, float] = (-146.0, 101.42)
    n_iterations: int = 3
    n_subsets: int = 8
    scanner_psf_fwhm_mm: float = 4.5
    recon_psf_fwhm_mm: float = 4.0
    counts_per_slice: tuple[float, float] = (0.6e6, 5.0e6)
    max_lesions: int = 4
    axial_psf_modelled: bool = False
    tof_gain: float = 1.0

    def __post_init__(self):
        if not self.tof_gain > 0:
            raise ValueError(f"CohortSpec.tof_gain must be positive, got {self.tof_gain}")
        for name in ("n_patients", "n_slices", "size", "recon_size", "n_angles"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CohortSpec.{name} must be a positive integer")
        if self.size % self.recon_size and self.recon_size % self.size:
            raise ValueError(
                f"CohortSpec.size ({self.size}) and recon_size ({self.recon_size}) must divide "
                "one another"
            )
        if self.z_range_mm[1] <= self.z_range_mm[0]:
            raise ValueError(f"CohortSpec.z_range_mm must be (bottom, top), got {self.z_range_mm}")
        if self.n_angles % self.n_subsets:
            raise ValueError(
                f"CohortSpec.n_angles ({self.n_angles}) must be a multiple of n_subsets "
                f"({self.n_subsets})"
            )

    @property
    def slice_mm(self) -> float:
        return (self.z_range_mm[1] - self.z_range_mm[0]) / self.n_slices

    @property
    def pixel_mm(self) -> float:
        return self.fov_mm / self.size

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size `(z, y, x)` in mm, as `Volume.spacing`."""
        return (self.slice_mm, self.pixel_mm, self.pixel_mm)

    @property
    def truth_size(self) -> int:
        """Matrix of the fine grid the true activity is drawn on (pixels ≤ 1.2 mm), a multiple
        of both `size` and `recon_size` so it block-averages onto either."""
        size = self.size * max(1, math.ceil(self.pixel_mm / 1.2))
        return size * self.recon_size // math.gcd(size, self.recon_size)


PRESETS: dict[str, CohortSpec] = {
    # The paper's cohort: 33 patients × 89 slices × 384² (20 train / 4 val / 9 test), a brain
    # field of view and a high-iteration 3D PSF + TOF reconstruction (see docstring).
    "paper": CohortSpec(
        n_patients=33,
        n_slices=89,
        size=384,
        recon_size=192,
        n_angles=168,
        fov_mm=260.0,
        n_iterations=4,
        n_subsets=56,
        axial_psf_modelled=True,
        tof_gain=3.0,
    ),
    # A CPU-sized cohort with enough patients for a train / val / test split.
    "small": CohortSpec(
        n_patients=12, n_slices=40, size=128, recon_size=128, n_angles=96, n_subsets=16
    ),
    # Unit tests: a whole head in a few seconds.
    "tiny": CohortSpec(n_patients=4, n_slices=12, size=64, recon_size=64, n_angles=48, n_subsets=8),
}


def patient_id(index: int) -> str:
    return f"sub-{index + 1:03d}"


# --------------------------------------------------------------------------------------------
# Tissues and the analytic head model
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tissue:
    """What one tissue class contributes: FDG uptake relative to grey matter, μ (1/cm), T1
    intensity (on the MNI template's 0–255 scale, where white matter ≈ 220), and label."""

    uptake: float
    mu_per_cm: float
    t1: float
    label: int


# Relative FDG uptake from typical head-and-neck SUV ratios: brain grey matter dominates, the
# extraocular muscles, tonsils and salivary glands are the hot extra-cerebral structures.
TISSUES: dict[str, Tissue] = {
    "air": Tissue(0.0, 0.0, 0.0, 0),
    "scalp": Tissue(0.10, MU_SOFT_TISSUE_PER_CM, 185.0, 4),
    "soft": Tissue(0.12, MU_SOFT_TISSUE_PER_CM, 105.0, 4),
    "muscle": Tissue(0.17, MU_SOFT_TISSUE_PER_CM, 85.0, 4),
    "temporalis": Tissue(0.15, MU_SOFT_TISSUE_PER_CM, 85.0, 4),
    "bone": Tissue(0.05, MU_BONE_PER_CM, 30.0, 5),
    "marrow": Tissue(0.14, 0.13, 140.0, 5),
    "csf": Tissue(0.04, MU_SOFT_TISSUE_PER_CM, 40.0, 3),
    "eye": Tissue(0.04, MU_SOFT_TISSUE_PER_CM, 35.0, 4),
    "orbital_fat": Tissue(0.05, 0.09, 215.0, 4),
    "eye_muscle": Tissue(0.45, MU_SOFT_TISSUE_PER_CM, 85.0, 4),
    "gland": Tissue(0.30, MU_SOFT_TISSUE_PER_CM, 165.0, 4),
    "tonsil": Tissue(0.55, MU_SOFT_TISSUE_PER_CM, 115.0, 4),
    "tongue": Tissue(0.26, MU_SOFT_TISSUE_PER_CM, 95.0, 4),
    "mucosa": Tissue(0.22, MU_SOFT_TISSUE_PER_CM, 120.0, 4),
    "cord": Tissue(0.22, MU_SOFT_TISSUE_PER_CM, 150.0, 4),
}
BRAIN_TISSUES = ("grey", "white", "csf")

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
_FACE_AND_NECK = _tube(
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
_NOSE = _tube(
    "soft",
    [(-90, 0, 84, 9, 4), (-80, 0, 90, 15, 10), (-70, 0, 94, 14, 12), (-55, 0, 90, 10, 10),
     (-40, 0, 86, 7, 7), (-28, 0, 82, 6, 5)],
)  # fmt: skip


# The face and neck under their subcutaneous fat layer.
_FACE_AND_NECK_INNER = _tube(
    "soft",
    [(z, cx, cy, a - SUBCUTANEOUS_MM, b - SUBCUTANEOUS_MM) for z, cx, cy, a, b in
     _FACE_AND_NECK.knots],
    power=_FACE_AND_NECK.power,
)  # fmt: skip


# Painted in order, each over the previous (partial volumes blend).
_LOWER_HEAD: tuple[Shape, ...] = (
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


def _occupancy(signed_distance: np.ndarray, edge_mm: float) -> np.ndarray:
    """Fraction of a voxel inside a surface, from the signed distance (mm, negative inside).

    A linear ramp one voxel wide is the area fraction of a voxel cut by a straight edge.
    """
    return np.clip(0.5 - signed_distance / edge_mm, 0.0, 1.0, dtype=np.float32)


def _shape_box(shape: Shape, edge_mm: float) -> tuple[tuple[float, float], ...] | None:
    """MNI `((x0, x1), (y0, y1), (z0, z1))` outside which `shape` (and its mirror copy) has no
    occupancy at all on a grid of `edge_mm` voxels; None where no simple box is worked out.

    Outside a box stretched by `edge_mm / smallest radius` the signed distance is at least one
    voxel (twice the half voxel where `_occupancy` reaches 0), so skipping those points changes
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


# --------------------------------------------------------------------------------------------
# MNI template maps
# --------------------------------------------------------------------------------------------

_ATLAS_CHANNELS = ("brain", "grey", "white", "t1", "icv_distance")
# Below the template's lowest slice (z = -72, the medulla), room for the shells around it.
_ATLAS_PAD_BELOW_MM = 20


@dataclasses.dataclass(frozen=True)
class Atlas:
    """The MNI maps the head is drawn from, stacked for one trilinear gather per voxel.

    `stack[x, y, z, c]` on a 1 mm grid whose voxel (0, 0, 0) sits at `origin` (MNI RAS mm);
    channels are `_ATLAS_CHANNELS`: brain occupancy (skull-stripped T1 > 0), grey and white
    matter probabilities, T1 intensity, and the distance (mm) outside the intracranial volume.
    `lesion_sites` are MNI points (mm) deep enough in the brain for lesions, with their depth.
    """

    stack: np.ndarray
    origin: np.ndarray
    lesion_sites: np.ndarray
    lesion_depth_mm: np.ndarray


def _nilearn_map(name: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib
    import nilearn

    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    path = folder / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the MNI152 2009a {name} template that nilearn ships is missing; "
            "reinstall nilearn (pip install --force-reinstall nilearn)"
        )
    image = nib.load(str(path))
    if not np.allclose(np.abs(np.diag(image.affine)[:3]), 1.0):
        raise ValueError(f"{path}: expected a 1 mm template, got affine {image.affine.tolist()}")
    return np.asarray(image.dataobj, np.float32), image.affine


# Exponent that sharpens the template's tissue probabilities into one brain's tissue fractions.
TISSUE_SHARPENING = 3.0


def _sharpen_tissues(grey, white, brain):
    """Tissue fractions of one brain from the population template's probabilities.

    The MNI maps average 152 brains, so the cortical ribbon is smeared over several millimetres
    and a "grey" voxel is rarely more than 70 % grey; a single brain has crisp grey/white and
    grey/CSF boundaries. Raising the three probabilities to a power and renormalising keeps the
    boundaries where they are and the partial volume of their voxels, but restores pure tissue
    either side, so the true grey:white ratio is visible at the scale of the anatomy.
    """
    csf = np.clip(brain - grey - white, 0.0, None)
    powered = [np.power(p, TISSUE_SHARPENING) for p in (grey, white, csf)]
    total = powered[0] + powered[1] + powered[2]
    safe = np.where(total > 0, total, 1.0)
    return powered[0] / safe * brain, powered[1] / safe * brain


@functools.lru_cache(maxsize=1)
def load_atlas() -> Atlas:
    """Build the template maps once per process (a few seconds)."""
    t1, affine = _nilearn_map("t1")
    grey, _ = _nilearn_map("gm")
    white, _ = _nilearn_map("wm")
    pad = ((0, 0), (0, 0), (_ATLAS_PAD_BELOW_MM, 0))
    t1, grey, white = (np.pad(a, pad) for a in (t1, grey, white))
    origin = affine[:3, 3] - np.array([0.0, 0.0, _ATLAS_PAD_BELOW_MM])
    brain = t1 > 0
    grey = grey / 255.0
    white = white / 255.0
    # The skull-stripped brain is the template's brain mask; its probability maps are ≤ 1 and
    # zero outside it, so CSF is what the mask holds beyond grey and white matter.
    grey *= brain
    white *= brain
    scale = grey + white
    over = scale > 1.0
    grey[over] /= scale[over]
    white[over] /= scale[over]
    grey, white = _sharpen_tissues(grey, white, brain.astype(np.float32))

    # Intracranial volume: the brain closed over sulci and the tentorial gaps (on a 2 mm grid,
    # enough for a surface the skull follows), then distances outward at 1 mm.
    coarse = brain[::2, ::2, ::2]
    outside = ndi.distance_transform_edt(~coarse, sampling=2.0)
    dilated = outside <= 8.0
    closed = ndi.distance_transform_edt(dilated, sampling=2.0) > 6.0
    closed = ndi.binary_fill_holes(closed | coarse)
    icv_distance = ndi.distance_transform_edt(~closed, sampling=2.0).astype(np.float32)
    icv_distance -= ndi.distance_transform_edt(closed, sampling=2.0).astype(np.float32)
    icv_distance = ndi.zoom(icv_distance, 2.0, order=1, mode="nearest")
    icv_distance = icv_distance[: brain.shape[0], : brain.shape[1], : brain.shape[2]]
    icv_distance = np.pad(
        icv_distance,
        [(0, n - m) for n, m in zip(brain.shape, icv_distance.shape, strict=True)],
        mode="edge",
    )
    stack = np.stack(
        [brain.astype(np.float32), grey, white, t1 * brain, icv_distance], axis=-1
    ).astype(np.float32)

    depth = ndi.distance_transform_edt(coarse, sampling=2.0)
    sites = np.argwhere(depth >= 6.0)
    lesion_sites = sites * 2.0 + origin
    return Atlas(
        stack=np.ascontiguousarray(stack),
        origin=origin,
        lesion_sites=lesion_sites.astype(np.float32),
        lesion_depth_mm=depth[tuple(sites.T)].astype(np.float32),
    )


def _trilinear(atlas: Atlas, x, y, z) -> np.ndarray:
    """Atlas channels at MNI points (mm): `[..., channels]`; points outside take edge values."""
    stack = atlas.stack
    shape = stack.shape[:3]
    flat = stack.reshape(-1, stack.shape[3])
    indices, weights = [], []
    for coord, origin, n in zip((x, y, z), atlas.origin, shape, strict=True):
        position = np.clip((coord - origin).astype(np.float32), 0.0, n - 1.001)
        lower = position.astype(np.int32)
        indices.append(lower)
        weights.append(position - lower)
    base = ((indices[0] * shape[1] + indices[1]) * shape[2] + indices[2]).ravel()
    along_x, along_y, along_z = ((1 - w, w) for w in weights)
    out = None
    for dx in (0, 1):
        for dy in (0, 1):
            wxy = along_x[dx] * along_y[dy]
            for dz in (0, 1):
                w = (wxy * along_z[dz]).reshape(-1, 1)
                offset = (dx * shape[1] + dy) * shape[2] + dz
                term = np.take(flat, base + offset, axis=0) * w  # float64, as the weights
                if out is None:
                    out = term
                else:
                    out += term
    return out.reshape(*np.shape(x), stack.shape[3])


# --------------------------------------------------------------------------------------------
# One patient
# --------------------------------------------------------------------------------------------

_STREAMS = {"pose": 1, "uptake": 2, "lesions": 3, "counts": 4, "mr": 5, "scanner": 6}


def _rng(seed: int, index: int, stream: str) -> np.random.Generator:
    """Independent random streams per patient and purpose, so changing one setting (say the
    count level) leaves the anatomy of every patient unchanged."""
    return np.random.default_rng([seed, index, _STREAMS[stream]])


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


def _draw_pose(rng: np.random.Generator) -> Pose:
    size = rng.uniform(0.93, 1.05)
    return Pose(
        rotation_deg=tuple(rng.uniform(-6.0, 6.0, 3) * np.array([1.0, 0.6, 1.0])),
        scale=tuple(size * (1.0 + rng.uniform(-0.035, 0.035, 3))),
        shift_mm=tuple(rng.uniform(-5.0, 5.0, 3) * np.array([1.0, 1.0, 0.5])),
        warp=tuple(SmoothField.draw(rng, amplitude=3.0) for _ in range(3)),
    )


def grid_axes(spec: CohortSpec, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World (LPS mm) coordinates of the voxel centres of a `size`² grid: (x, y, z) axes."""
    pixel = spec.fov_mm / size
    centred = (np.arange(size) - (size - 1) / 2.0) * pixel
    z = spec.z_range_mm[0] + (np.arange(spec.n_slices) + 0.5) * spec.slice_mm
    # The field of view is centred 8 mm behind the MNI origin, the middle of nose-to-occiput.
    return centred, centred + 8.0, z


def grid_affine(spec: CohortSpec) -> np.ndarray:
    """4×4 voxel `(col, row, slice)` → LPS mm affine of the output grid."""
    x, y, z = grid_axes(spec, spec.size)
    affine = np.diag([spec.pixel_mm, spec.pixel_mm, spec.slice_mm, 1.0])
    affine[:3, 3] = (x[0], y[0], z[0])
    return affine


def _template_coordinates(pose: Pose, x, y, z) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _paint(maps, alpha, tissue: Tissue, uptake: float, where: np.ndarray | None = None):
    """Blend one tissue over the maps with partial-volume fraction `alpha` (at the points
    `where`, alpha's positions, if given; the others have none of the tissue)."""
    if where is not None:
        for target, value in zip(maps[:3], (uptake, tissue.mu_per_cm, tissue.t1), strict=True):
            old = target[where]
            target[where] = old + alpha * (value - old)
        maps[3][where[alpha >= 0.5]] = tissue.label
        return
    activity, mu, t1, labels = maps
    activity += alpha * (uptake - activity)
    mu += alpha * (tissue.mu_per_cm - mu)
    t1 += alpha * (tissue.t1 - t1)
    labels[alpha >= 0.5] = tissue.label


# Every structure lies inside this box-like super-ellipse of MNI x, y (mm); points outside it
# are air and skip the per-point work (about half of a 300 mm field of view).
_HEAD_HALF_WIDTH_MM, _HEAD_HALF_DEPTH_MM, _HEAD_CENTRE_Y_MM = 96.0, 122.0, -7.0


def _head_candidates(tx: np.ndarray, ty: np.ndarray) -> np.ndarray:
    return (np.abs(tx) / _HEAD_HALF_WIDTH_MM) ** 4 + (
        np.abs(ty - _HEAD_CENTRE_Y_MM) / _HEAD_HALF_DEPTH_MM
    ) ** 4 <= 1.0


def _paint_head(tx, ty, tz, atlas: Atlas, uptakes: dict[str, float], grey_uptake, edge: float):
    """Uptake, μ, T1, label, brain, grey and white maps at MNI points (1D arrays)."""
    brain, grey, white, t1_brain, icv_distance = _trilinear(atlas, tx, ty, tz).T
    z_low, z_high = float(tz.min()), float(tz.max())
    maps = (
        np.zeros(tx.shape, np.float32),
        np.zeros(tx.shape, np.float32),
        np.zeros(tx.shape, np.float32),
        np.zeros(tx.shape, np.uint8),
    )

    def paint(alpha, name, where=None):
        _paint(maps, alpha, TISSUES[name], uptakes[name], where)

    def shape_alpha(shape: Shape):
        """`(where, alpha)`: the shape's occupancy at the points `where` (None: all points);
        None where it has none in this slab."""
        low, high = shape.z_extent()
        if high < z_low - edge or low > z_high + edge:
            return None
        where, x, y, z = None, tx, ty, tz
        box = _shape_box(shape, edge)
        if box is not None:
            (x0, x1), (y0, y1), (z0, z1) = box
            inside = (tx >= x0) & (tx <= x1) & (ty >= y0) & (ty <= y1) & (tz >= z0) & (tz <= z1)
            where = np.flatnonzero(inside)
            if where.size == 0:
                return None
            x, y, z = tx[where], ty[where], tz[where]
        alpha = _occupancy(_shape_distance(shape, x, y, z), edge)
        if shape.mirror:
            mirrored = _shape_distance(shape, x, y, z, sign=-1.0)
            alpha = np.maximum(alpha, _occupancy(mirrored, edge))
        return where, alpha

    def full_alpha(shape: Shape):
        """The shape's occupancy at every point, or None."""
        found = shape_alpha(shape)
        if found is None or found[0] is None:
            return None if found is None else found[1]
        alpha = np.zeros(tx.shape, np.float32)
        alpha[found[0]] = found[1]
        return alpha

    # Skin and subcutaneous fat over the cranium, face and neck; deeper soft tissue inside.
    cranium = _occupancy(icv_distance - SCALP_OUTER_MM, edge)
    face = full_alpha(_FACE_AND_NECK)
    paint(cranium if face is None else np.maximum(cranium, face), "scalp")
    nose = full_alpha(_NOSE)
    if nose is not None:
        paint(nose, "soft")
    skull = _occupancy(icv_distance - SKULL_OUTER_MM, edge)
    inner = full_alpha(_FACE_AND_NECK_INNER)
    if inner is not None:
        paint(inner * (1.0 - skull), "soft")
    inside_rim = _occupancy(icv_distance - CSF_RIM_MM, edge)
    paint(np.clip(skull - inside_rim, 0.0, 1.0), "bone")
    outside_cavity = 1.0 - inside_rim
    for shape in _LOWER_HEAD:
        found = shape_alpha(shape)
        if found is None:
            continue
        where, alpha = found
        at = slice(None) if where is None else where
        if shape.tissue == "temporalis":
            # Only between the skull and the skin of the temple.
            alpha = alpha * (1.0 - skull[at])
            alpha = alpha * _occupancy(icv_distance[at] - SCALP_OUTER_MM + 2, edge)
        paint(alpha * outside_cavity[at], shape.tissue, where)
    paint(inside_rim, "csf")
    # The brain: template tissue fractions, grey matter with its regional variation.
    csf = np.clip(brain - grey - white, 0.0, None)
    activity, mu, t1, labels = maps
    activity *= 1.0 - brain
    activity += grey * grey_uptake + white * uptakes["white"] + csf * uptakes["csf"]
    mu += brain * (MU_SOFT_TISSUE_PER_CM - mu)
    t1 *= 1.0 - brain
    t1 += t1_brain
    brain_label = np.where(grey >= white, 1, 2).astype(np.uint8)
    brain_label[(csf > grey) & (csf > white)] = 3
    in_brain = brain >= 0.5
    labels[in_brain] = brain_label[in_brain]
    return activity, mu, t1, labels, brain, grey, white


def anatomy(
    pose: Pose,
    uptakes: dict[str, float],
    metabolism: SmoothField,
    spec: CohortSpec,
    size: int,
    *,
    chunk: int = 4,
) -> Anatomy:
    """A patient's head on a `size`² grid of `spec`'s slices (see module docstring)."""
    atlas = load_atlas()
    x, y, z = grid_axes(spec, size)
    edge = spec.fov_mm / size
    shape = (len(z), size, size)
    out = Anatomy(
        uptake=np.zeros(shape, np.float32),
        mu_per_cm=np.zeros(shape, np.float32),
        t1=np.zeros(shape, np.float32),
        labels=np.zeros(shape, np.uint8),
        brain=np.zeros(shape, np.float32),
        grey=np.zeros(shape, np.float32),
        white=np.zeros(shape, np.float32),
    )
    targets = (out.uptake, out.mu_per_cm, out.t1, out.labels, out.brain, out.grey, out.white)
    for start in range(0, len(z), chunk):
        zs = z[start : start + chunk]
        tx, ty, tz = _template_coordinates(pose, x, y, zs)
        where = np.flatnonzero(_head_candidates(tx, ty))
        if where.size == 0:
            continue
        grey_uptake = uptakes["grey"] * (1.0 + metabolism.on_grid(x, y, zs).ravel()[where])
        points = (tx.ravel()[where], ty.ravel()[where], tz.ravel()[where])
        values = _paint_head(*points, atlas, uptakes, grey_uptake, edge)
        for target, value in zip(targets, values, strict=True):
            target[start : start + len(zs)].reshape(-1)[where] = value
    return out


def _draw_uptakes(rng: np.random.Generator) -> tuple[dict[str, float], float, float]:
    """Relative uptakes (grey matter = 1) with per-patient variation, the grey:white ratio, and
    the grey-matter activity in Bq/mL."""
    grey_to_white = rng.uniform(3.6, 4.4)
    uptakes = {name: t.uptake * float(np.exp(rng.normal(0, 0.15))) for name, t in TISSUES.items()}
    uptakes["air"] = 0.0
    uptakes["grey"] = 1.0
    uptakes["white"] = 1.0 / grey_to_white
    uptakes["csf"] = TISSUES["csf"].uptake
    grey_bqml = rng.uniform(8000.0, 15000.0)
    return uptakes, grey_to_white, grey_bqml


@dataclasses.dataclass(frozen=True)
class Lesion:
    label: int
    kind: str  # "hot" or "cold"
    radius_mm: float
    contrast: float  # lesion activity / mean activity of the shell r..2r around it
    centre_mm: tuple[float, float, float]  # world LPS


def _draw_lesions(
    rng: np.random.Generator, spec: CohortSpec, pose: Pose, atlas: Atlas
) -> list[Lesion]:
    count = int(rng.integers(1, spec.max_lesions + 1)) if spec.max_lesions > 0 else 0
    lesions: list[Lesion] = []
    bottom, top = spec.z_range_mm
    for _ in range(50 * count):
        if len(lesions) == count:
            break
        radius = float(np.exp(rng.uniform(np.log(3.0), np.log(14.0))))
        site = int(rng.integers(len(atlas.lesion_sites)))
        # Deep enough that the whole sphere is brain (with the warp's few mm to spare).
        if atlas.lesion_depth_mm[site] < radius / min(pose.scale) + 3.0:
            continue
        centre = pose.to_world(atlas.lesion_sites[site])
        if not bottom + radius <= centre[2] <= top - radius:
            continue
        if any(
            np.linalg.norm(centre - np.asarray(other.centre_mm)) < radius + other.radius_mm + 8
            for other in lesions
        ):
            continue
        hot = bool(rng.random() < 0.5)
        contrast = rng.uniform(1.6, 3.5) if hot else rng.uniform(0.15, 0.6)
        lesions.append(
            Lesion(
                label=len(lesions) + 1,
                kind="hot" if hot else "cold",
                radius_mm=round(radius, 3),
                contrast=round(float(contrast), 4),
                centre_mm=tuple(round(float(c), 3) for c in centre),
            )
        )
    return lesions


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


def _insert_lesions(activity: np.ndarray, lesions: list[Lesion], spec: CohortSpec, size: int):
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
        alpha = _occupancy(distance - lesion.radius_mm, edge)
        activity[box] += alpha * (lesion.contrast * surround - activity[box])
    return activity


def lesion_map(lesions: list[Lesion], spec: CohortSpec) -> np.ndarray:
    """Lesion labels on the output grid: voxels whose centre lies inside a lesion."""
    labels = np.zeros((spec.n_slices, spec.size, spec.size), np.uint8)
    for lesion in lesions:
        box, distance = _lesion_window(lesion, spec, spec.size, lesion.radius_mm + spec.pixel_mm)
        labels[box][distance <= lesion.radius_mm] = lesion.label
    return labels


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return array
    n, h, w = array.shape
    return array.reshape(n, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def _block_mode(labels: np.ndarray, factor: int, n_codes: int) -> np.ndarray:
    if factor == 1:
        return labels
    fractions = [_block_mean((labels == code).astype(np.float32), factor) for code in
                 range(n_codes)]  # fmt: skip
    return np.argmax(np.stack(fractions), axis=0).astype(np.uint8)


def _cubic_weights(offset: np.ndarray) -> np.ndarray:
    """Keys cubic convolution weights (a = -0.5) of taps -1, 0, 1, 2 at fractional `offset`."""
    a = -0.5
    taps = np.abs(offset[:, None] - np.arange(-1, 3)[None, :])
    near = ((a + 2) * taps - (a + 3)) * taps**2 + 1
    far = ((taps - 5) * taps + 8) * taps * a - 4 * a
    return np.where(taps <= 1, near, np.where(taps < 2, far, 0.0))


def resample_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Dense `[size_out, size_in]` cubic interpolation over the same field of view.

    Pixel centres stay where they are physically (`in = (out + 0.5) · size_in / size_out - 0.5`);
    edges repeat the border pixel. As a matrix, resampling a whole volume is two BLAS products.
    """
    position = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    lower = np.floor(position).astype(int)
    weights = _cubic_weights(position - lower)
    matrix = np.zeros((size_out, size_in))
    for tap in range(4):
        np.add.at(matrix, (np.arange(size_out), np.clip(lower - 1 + tap, 0, size_in - 1)),
                  weights[:, tap])  # fmt: skip
    return matrix.astype(np.float32)


def _resize_in_plane(images: np.ndarray, size: int) -> np.ndarray:
    """Images `[slices, n, n]` → `[slices, size, size]`: block mean down, cubic up."""
    n = images.shape[-1]
    if size == n:
        return images
    if size < n:
        return _block_mean(images, n // size)
    matrix_t = resample_matrix(n, size).T
    slices = images.shape[0]
    # Two plain 2D BLAS products (a stacked matmul would loop slice by slice).
    columns = images.reshape(-1, n) @ matrix_t  # [slices * n, size]
    rows = columns.reshape(slices, n, size).transpose(0, 2, 1).reshape(-1, n) @ matrix_t
    return np.clip(rows.reshape(slices, size, size).transpose(0, 2, 1), 0.0, None)


@functools.lru_cache(maxsize=4)
def _normalisation(geometry: scanner.ScannerGeometry) -> np.ndarray:
    """Per-bin detector efficiencies of the (one, simulated) scanner: fixed, not per patient."""
    rng = np.random.default_rng(20240611)
    return np.exp(rng.normal(0.0, 0.05, geometry.n_angles * geometry.n_bins)).astype(np.float32)


def acquire_and_reconstruct(
    activity: np.ndarray,
    mu_per_cm: np.ndarray,
    spec: CohortSpec,
    counts_per_slice: float,
    scatter_fraction: float,
    randoms_fraction: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Simulated PSF-OSEM PET `[slices, recon_size, recon_size]` (Bq/mL) of a true activity map
    (Bq/mL) and μ-map on the recon grid (see module docstring)."""
    size = spec.recon_size
    pixel_mm = spec.fov_mm / size
    geometry = scanner.ScannerGeometry(size=size, pixel_mm=pixel_mm, n_angles=spec.n_angles)
    matrix = scanner.system_matrix(geometry)
    # Axial resolution: the PSF across slices, less what a 3D PSF model recovers where the
    # scanner's reconstruction has one (this one is 2D per slice); the in-plane PSF as a radial
    # blur of the projections.
    axial_fwhm_mm = spec.scanner_psf_fwhm_mm
    if spec.axial_psf_modelled:
        axial_fwhm_mm = math.sqrt(max(axial_fwhm_mm**2 - spec.recon_psf_fwhm_mm**2, 0.0))
    sigma_slices = axial_fwhm_mm * scanner.FWHM_TO_SIGMA / spec.slice_mm
    blurred = (
        ndi.gaussian_filter1d(activity, sigma_slices, axis=0, mode="nearest")
        if sigma_slices > 0
        else activity
    )
    line_integrals = scanner.blur_radial(
        matrix @ scanner.to_columns(blurred), size, spec.scanner_psf_fwhm_mm, pixel_mm
    )  # [bins, slices], Bq/mL × mm
    attenuation = np.exp(-(matrix @ scanner.to_columns(mu_per_cm / 10.0)))  # μ in 1/mm
    efficiency = _normalisation(geometry)[:, None] * attenuation
    trues_shape = efficiency * line_integrals
    # Non-TOF data with the noise of a TOF acquisition of `counts_per_slice` (docstring).
    simulated_counts = counts_per_slice * spec.tof_gain
    calibration = simulated_counts * activity.shape[0] / max(float(trues_shape.sum()), 1e-12)
    multiplicative = (calibration * efficiency).astype(np.float32)
    trues = multiplicative * line_integrals
    # Scatter: the attenuated trues spread broadly across bins (radial FWHM 100 mm).
    views = trues.reshape(spec.n_angles, size, -1)
    scatter = ndi.gaussian_filter1d(views, 100.0 * scanner.FWHM_TO_SIGMA / pixel_mm, axis=1)
    scatter = scatter.reshape(trues.shape)
    scatter *= scatter_fraction / (1 - scatter_fraction - randoms_fraction) * trues.sum(0) / (
        np.maximum(scatter.sum(0), 1e-12)
    )  # fmt: skip
    randoms = np.broadcast_to(
        randoms_fraction / (1 - scatter_fraction - randoms_fraction) * trues.mean(0), trues.shape
    )
    additive = (scatter + randoms).astype(np.float32)
    counts = rng.poisson(trues + additive).astype(np.float32)
    return scanner.osem(
        geometry,
        counts,
        multiplicative,
        additive,
        n_iterations=spec.n_iterations,
        n_subsets=spec.n_subsets,
        psf_fwhm_mm=spec.recon_psf_fwhm_mm,
    )


def generate_patient(spec: CohortSpec, index: int, seed: int = 0) -> dict[str, Any]:
    """One synthetic patient, deterministic in `(spec, index, seed)`.

    Returns a dict with, all `[slices, size, size]` on the output grid:
      pet: float32 reconstructed PET, Bq/mL.
      activity: float32 true activity (lesions included, no blur or noise), Bq/mL.
      t1: float32 co-registered T1 MR (integer-valued, template scale: white matter ≈ 220).
      mask: uint8 brain mask (1 inside the skull-stripped brain).
      labels: uint8 tissue codes (`LABELS`).
      lesions: uint8 lesion labels 1..K (0 elsewhere).
      mu_per_cm: float32 attenuation map, 1/cm.
    and
      geometry: {"spacing": (z, y, x) mm, "affine": 4×4 LPS, "shape"}.
      facts: JSON-ready patient facts (uptake scale, count level, pose, lesions...).
    """
    if not 0 <= index < spec.n_patients:
        raise ValueError(f"patient index {index} outside 0..{spec.n_patients - 1}")
    pose = _draw_pose(_rng(seed, index, "pose"))
    uptake_rng = _rng(seed, index, "uptake")
    uptakes, grey_to_white, grey_bqml = _draw_uptakes(uptake_rng)
    metabolism = SmoothField.draw(uptake_rng, amplitude=0.08)
    lesions = _draw_lesions(_rng(seed, index, "lesions"), spec, pose, load_atlas())

    truth_size = spec.truth_size
    fine = anatomy(pose, uptakes, metabolism, spec, truth_size)
    activity_fine = _insert_lesions(fine.uptake * grey_bqml, lesions, spec, truth_size)

    count_rng = _rng(seed, index, "counts")
    low, high = spec.counts_per_slice
    counts_per_slice = float(np.exp(count_rng.uniform(np.log(low), np.log(high))))
    counts_per_slice *= spec.slice_mm / REFERENCE_SLICE_MM
    scatter_fraction = float(count_rng.uniform(0.30, 0.40))
    randoms_fraction = float(count_rng.uniform(0.05, 0.15))
    to_recon = truth_size // spec.recon_size
    recon = acquire_and_reconstruct(
        _block_mean(activity_fine, to_recon),
        _block_mean(fine.mu_per_cm, to_recon),
        spec,
        counts_per_slice,
        scatter_fraction,
        randoms_fraction,
        count_rng,
    )
    pet = _resize_in_plane(recon, spec.size) * scanner.fov_mask(spec.size)

    to_output = truth_size // spec.size
    t1 = _block_mean(fine.t1, to_output)
    mr_rng = _rng(seed, index, "mr")
    bias = SmoothField.draw(mr_rng, amplitude=0.08)
    x, y, z = grid_axes(spec, spec.size)
    t1 = t1 * (1.0 + bias.on_grid(x, y, z)) * mr_rng.uniform(0.9, 1.1)
    # Magnitude images have a Rician noise floor; scanners store integers (which also makes the
    # NIfTI file three times smaller than float noise would).
    t1 = np.rint(np.abs(t1 + mr_rng.normal(0.0, 4.0, t1.shape))).astype(np.float32)

    facts = {
        "patient_id": patient_id(index),
        "uptake_scale_bqml": round(grey_bqml, 2),
        "grey_to_white_ratio": round(grey_to_white, 4),
        "counts_per_slice": round(counts_per_slice, 1),
        "total_counts": round(counts_per_slice * spec.n_slices, 1),
        "scatter_fraction": round(scatter_fraction, 4),
        "randoms_fraction": round(randoms_fraction, 4),
        "head_scale": [round(float(s), 4) for s in pose.scale],
        "rotation_deg": [round(float(r), 3) for r in pose.rotation_deg],
        "shift_mm": [round(float(s), 3) for s in pose.shift_mm],
        "relative_uptake": {k: round(v, 4) for k, v in sorted(uptakes.items())},
        "lesions": [dataclasses.asdict(lesion) for lesion in lesions],
    }
    return {
        "pet": pet.astype(np.float32),
        "activity": _block_mean(activity_fine, to_output).astype(np.float32),
        "t1": t1,
        "mask": (_block_mean(fine.brain, to_output) >= 0.5).astype(np.uint8),
        "labels": _block_mode(fine.labels, to_output, len(LABELS)),
        "lesions": lesion_map(lesions, spec),
        "mu_per_cm": _block_mean(fine.mu_per_cm, to_output).astype(np.float32),
        "geometry": {
            "spacing": spec.spacing,
            "affine": grid_affine(spec),
            "shape": (spec.n_slices, spec.size, spec.size),
        },
        "facts": facts,
    }


# --------------------------------------------------------------------------------------------
# On disk
# --------------------------------------------------------------------------------------------

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SCT = "SCT"  # SNOMED CT, the coding scheme the PET IOD's code sequences expect


def _code(value: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, _SCT, meaning
    return item


def _dicom_header(spec: CohortSpec, facts: dict, seed: int):
    """Patient, study and acquisition attributes for `io.write_dicom` to copy.

    Only what the simulation defines is filled (F-18 FDG, head-first supine, the corrections
    applied); clinical facts it cannot know (birth date, sex, weight, dose) stay absent, so the
    writer leaves its Type 2 attributes empty. UIDs derive from the seed and patient id, so a
    regenerated cohort keeps its study and frame of reference.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    pid = facts["patient_id"]
    entropy = [GENERATOR, VERSION, str(seed), pid]
    header = Dataset()
    header.PatientName = f"Synthetic^{pid}"
    header.PatientID = pid
    header.StudyInstanceUID = generate_uid(entropy_srcs=[*entropy, "study"])
    header.FrameOfReferenceUID = generate_uid(entropy_srcs=[*entropy, "frame"])
    header.StudyDescription = "Synthetic FDG brain PET"
    header.StudyID = "1"
    header.BodyPartExamined = "BRAIN"
    header.Manufacturer = "petsr_jax"
    header.ManufacturerModelName = f"{GENERATOR} {VERSION}"
    header.CorrectedImage = ["NORM", "ATTN", "SCAT", "RAN"]
    header.ReconstructionMethod = (
        f"OSEM {spec.n_iterations}i{spec.n_subsets}s PSF {spec.recon_psf_fwhm_mm:g}mm"
        + (" 3D" if spec.axial_psf_modelled else "")
        + (" TOF" if spec.tof_gain != 1 else "")
    )[:64]
    header.AttenuationCorrectionMethod = "simulated mu-map"
    header.SliceThickness = f"{spec.slice_mm:.6g}"
    isotope = Dataset()
    isotope.Radiopharmaceutical = "Fluorodeoxyglucose"
    isotope.RadionuclideCodeSequence = Sequence([_code("77004003", "^18^Fluorine")])
    isotope.RadionuclideHalfLife = "6586.2"
    header.RadiopharmaceuticalInformationSequence = Sequence([isotope])
    recumbent = _code("102538003", "recumbent")
    recumbent.PatientOrientationModifierCodeSequence = Sequence([_code("40199007", "supine")])
    header.PatientOrientationCodeSequence = Sequence([recumbent])
    header.PatientGantryRelationshipCodeSequence = Sequence([_code("102540008", "headfirst")])
    return header


def _write_uint8_nifti(array: np.ndarray, affine_lps: np.ndarray, path: Path) -> None:
    """A uint8 map on the PET grid, with the axis mapping and affine of `io.write_nifti`.

    `io.write_nifti` stores float32; masks and labels stay integers so that
    `io.read_nifti_array` returns them as such.
    """
    import nibabel as nib

    image = nib.Nifti1Image(
        np.ascontiguousarray(array.astype(np.uint8).transpose(2, 1, 0)), _LPS_TO_RAS @ affine_lps
    )
    image.header.set_sform(_LPS_TO_RAS @ affine_lps, code=1)
    image.header.set_qform(_LPS_TO_RAS @ affine_lps, code=1)
    image.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.nii.gz")
    try:
        nib.save(image, str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_patient(patient: dict[str, Any], spec: CohortSpec, root: Path, seed: int) -> None:
    """Write one `generate_patient` result into a data root (layout in the module docstring)."""
    from petsr_jax import io
    from petsr_jax.volume import Volume

    facts = patient["facts"]
    pid = facts["patient_id"]
    affine = patient["geometry"]["affine"]
    pet = Volume(
        data=patient["pet"],
        spacing=spec.spacing,
        units="BQML",
        patient_id=pid,
        affine=affine,
        space="LPS",
        headers=[_dicom_header(spec, facts, seed)],
    )
    io.write_dicom(pet, root / pid, series_description="FDG PET PSF-OSEM", series_number=1)
    t1 = Volume(data=patient["t1"], spacing=spec.spacing, patient_id=pid, affine=affine)
    io.write_nifti(t1, root / "t1" / f"{pid}.nii.gz")
    for folder, key in (("masks", "mask"), ("labels", "labels"), ("lesions", "lesions")):
        _write_uint8_nifti(patient[key], affine, root / folder / f"{pid}.nii.gz")


def _generate_and_write(spec: CohortSpec, index: int, seed: int, root: str) -> dict:
    """Worker entry point: one patient generated and written, its facts returned."""
    patient = generate_patient(spec, index, seed)
    write_patient(patient, spec, Path(root), seed)
    return patient["facts"]


def default_root(preset: str, seed: int) -> Path:
    """`$PETSR_DATA_DIR/cohort-<preset>-seed<seed>`, else under `~/.cache/petsr_jax`."""
    base = os.environ.get(DEFAULT_ROOT_ENV) or Path.home() / ".cache" / "petsr_jax"
    return Path(base) / f"cohort-{preset}-seed{seed}"


# Below this many fine-grid voxels in a cohort, starting worker processes (each imports the
# package and builds the template maps) costs more than it saves.
_PARALLEL_MIN_VOXELS = 10_000_000


def _default_workers(spec: CohortSpec) -> int:
    if spec.n_patients * spec.n_slices * spec.truth_size**2 < _PARALLEL_MIN_VOXELS:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    # Each worker holds about 1 GB at the paper size; more than 8 gains little on one host.
    return max(1, min(cpus, spec.n_patients, 8))


def _check_finished(root: Path, preset: str, seed: int) -> None:
    """A finished root must be the cohort asked for, not an older version or another seed."""
    path = root / "cohort.json"
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable cohort description ({error})") from error
    expected = {"generator": GENERATOR, "version": VERSION, "preset": preset, "seed": seed}
    wrong = {k: recorded.get(k) for k, v in expected.items() if recorded.get(k) != v}
    if wrong:
        raise ValueError(
            f"{path}: holds {wrong}, expected {expected}; delete {root} to regenerate it or "
            "pass another root"
        )


def generate_cohort(
    spec: CohortSpec,
    root,
    *,
    seed: int = 0,
    preset: str = "custom",
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Generate a cohort into `root`, which must not hold one yet, and return `root`.

    Patients are generated in parallel worker processes (`workers`, default: the available
    CPUs up to 8, or 1 for cohorts too small to repay starting processes; 1 runs in this
    process) into a hidden sibling folder; cohort.json is written
    last and the folder renamed to `root` only when everything is there.
    """
    from tqdm.auto import tqdm

    root = Path(root).expanduser().absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(
            f"{root}: exists and holds no finished cohort (no cohort.json); remove it or pass "
            "another root"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    workers = _default_workers(spec) if workers is None else max(1, int(workers))
    partial = root.parent / f".{root.name}.partial-{uuid.uuid4().hex}"
    partial.mkdir()
    facts: list[dict | None] = [None] * spec.n_patients
    bar = tqdm(total=spec.n_patients, desc=f"cohort {preset}", unit="patient", disable=not progress)
    try:
        if workers == 1:
            for index in range(spec.n_patients):
                facts[index] = _generate_and_write(spec, index, seed, str(partial))
                bar.update()
        else:
            # Spawned, not forked: the parent may have started JAX's threads.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = {
                    pool.submit(_generate_and_write, spec, index, seed, str(partial)): index
                    for index in range(spec.n_patients)
                }
                for future in concurrent.futures.as_completed(futures):
                    facts[futures[future]] = future.result()
                    bar.update()
        description = {
            "generator": GENERATOR,
            "version": VERSION,
            "preset": preset,
            "seed": seed,
            "n_patients": spec.n_patients,
            "shape": [spec.n_slices, spec.size, spec.size],
            "spacing_mm": list(spec.spacing),
            "units": "BQML",
            "spec": dataclasses.asdict(spec),
            "labels": {str(code): name for code, name in LABELS.items()},
            "patients": facts,
        }
        (partial / "cohort.json.tmp").write_text(json.dumps(description, indent=1))
        os.replace(partial / "cohort.json.tmp", partial / "cohort.json")
        try:
            os.rename(partial, root)
        except OSError:
            if not (root / "cohort.json").is_file():
                raise
            # Another process finished the same cohort first; theirs is as good as ours.
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        bar.close()
    return root


def ensure_cohort(
    preset: str = "paper",
    *,
    root=None,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """The data root of a preset cohort, generated on first use and reused afterwards.

    `root` defaults to `default_root(preset, seed)`. A root holding cohort.json is finished and
    returned as it is (after checking it is this generator, version, preset and seed).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown cohort preset {preset!r}; expected one of {sorted(PRESETS)}")
    root = default_root(preset, seed) if root is None else Path(root).expanduser().absolute()
    if (root / "cohort.json").is_file():
        _check_finished(root, preset, seed)
        return root
    return generate_cohort(
        PRESETS[preset], root, seed=seed, preset=preset, progress=progress, workers=workers
    )


# --------------------------------------------------------------------------------------------
# A picture to look at
# --------------------------------------------------------------------------------------------

# MNI heights (mm) of the montage's fixed levels: lower jaw, cerebellum, basal ganglia, upper
# brain.
_MONTAGE_LEVELS_MM = (("jaw", -118.0), ("cerebellum", -38.0), ("basal ganglia", 4.0),
                      ("vertex", 52.0))  # fmt: skip


def save_montage(root, path=None, *, n_patients: int = 3) -> Path:
    """A PNG of a few patients' PET and T1 at several axial levels, read back from disk.

    Columns: the fixed levels of `_MONTAGE_LEVELS_MM` plus the slice through each patient's
    largest lesion. Reading through `io.read_volume` shows what users of the root will see.
    Written to `<root>/montage.png` unless `path` is given.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from petsr_jax import io

    root = Path(root)
    description = json.loads((root / "cohort.json").read_text())
    spec_fields = dict(description["spec"])
    spec_fields["z_range_mm"] = tuple(spec_fields["z_range_mm"])
    spec_fields["counts_per_slice"] = tuple(spec_fields["counts_per_slice"])
    spec = CohortSpec(**spec_fields)
    patients = description["patients"][:n_patients]
    _, _, z = grid_axes(spec, spec.size)
    columns = len(_MONTAGE_LEVELS_MM) + 1
    figure = Figure(figsize=(2.2 * columns, 2.3 * 2 * len(patients)), dpi=110)
    axes = figure.subplots(2 * len(patients), columns, squeeze=False)
    for row, facts in enumerate(patients):
        pid = facts["patient_id"]
        pet = io.read_volume(root / pid).data
        t1, _ = io.read_nifti_array(root / "t1" / f"{pid}.nii.gz")
        lesions, _ = io.read_nifti_array(root / "lesions" / f"{pid}.nii.gz")
        levels = [(name, int(np.argmin(np.abs(z - height)))) for name, height in
                  _MONTAGE_LEVELS_MM]  # fmt: skip
        area = lesions.reshape(len(z), -1).astype(bool).sum(1)
        lesion_slice = int(np.argmax(area)) if area.any() else None
        if lesion_slice is not None:
            label = int(np.bincount(lesions[lesion_slice].ravel())[1:].argmax() + 1)
            kind = facts["lesions"][label - 1]["kind"]
            levels.append((f"{kind} lesion {label}", lesion_slice))
        pet_top = float(np.percentile(pet, 99.9)) or 1.0
        t1_top = float(np.percentile(t1, 99.5)) or 1.0
        for column, (name, index) in enumerate(levels):
            top, bottom = axes[2 * row, column], axes[2 * row + 1, column]
            top.imshow(pet[index], cmap="gray_r", vmin=0, vmax=pet_top)
            bottom.imshow(t1[index], cmap="gray", vmin=0, vmax=t1_top)
            top.set_title(f"{pid} PET · {name}\nslice {index} (z {z[index]:+.0f} mm)", fontsize=7)
            bottom.set_title(f"{pid} T1", fontsize=7)
            if index == lesion_slice:
                outline = (lesions[index] > 0).astype(float)
                top.contour(outline, levels=[0.5], colors="red", linewidths=0.6)
    for axis in axes.flat:
        axis.set_axis_off()
    figure.tight_layout()
    path = root / "montage.png" if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.png")
    try:
        figure.savefig(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
