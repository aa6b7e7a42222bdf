"""Cohort sizes and scanner settings (`CohortSpec`), the named presets, and their voxel grid.

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
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# The Signa PET/MR slice thickness the default axial coverage is built from (see docstring).
REFERENCE_SLICE_MM = 2.78


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
      lesions: (fewest, most) lesions per patient, each patient's count drawn between them
        (fewer where the brain has no room; most = 0 gives none).
      axial_psf_modelled: the scanner's reconstruction models the PSF in 3D (axially too). The
        simulation reconstructs slice by slice, so it then blurs the data across slices only by
        the part of the PSF the model leaves, sqrt(scanner² − model²); False blurs by the whole
        scanner PSF, as a 2D reconstruction would leave it.
      tof_gain: noise-equivalent count gain of time of flight. The simulated data are non-TOF,
        so a TOF scanner's noise is reached with `tof_gain` × the counts (see module docstring).
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
    lesions: tuple[int, int] = (1, 4)
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
    # field of view and a high-iteration 3D PSF + TOF reconstruction (see module docstring).
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
    # A CPU-sized cohort with enough patients for a train / val / test split, and lesions
    # enough to measure on: 16–20 per patient (34 in the quick 8/2/2 split's two test patients,
    # about 3.5 % of the brain), so lesion recovery is decided on dozens of lesions and PET-only
    # structure is common in training, not a rarity a network may ignore. 12 patients × 40
    # slices × 128².
    "small": CohortSpec(12, 40, 128, recon_size=128, n_angles=96, n_subsets=16, lesions=(16, 20)),
    # Unit tests: a whole head in a few seconds.
    "tiny": CohortSpec(n_patients=4, n_slices=12, size=64, recon_size=64, n_angles=48, n_subsets=8),
}


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
