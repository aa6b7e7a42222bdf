"""One synthetic patient: drawn from a seed, imaged by the simulated scanner, with its MR.

A patient is its random draws (head pose and size, uptakes, lesions, count level, MR bias), the
anatomy drawn on a fine grid (`petsr_jax.sim.anatomy`), the PET acquired and reconstructed from
it (`petsr_jax.sim.acquisition`), and the maps that come with a real study (a co-registered T1,
brain mask, tissue and lesion labels), all on the output grid. Each purpose draws from its own
random stream, so changing one setting (say the count level) leaves everything else about every
patient unchanged, and the same `(spec, index, seed)` gives the same patient bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from petsr_jax.sim import scanner
from petsr_jax.sim.acquisition import (
    acquire_and_reconstruct,
    block_mean,
    block_mode,
    resize_in_plane,
)
from petsr_jax.sim.anatomy import anatomy
from petsr_jax.sim.atlas import load_atlas
from petsr_jax.sim.lesions import draw_lesions, insert_lesions, lesion_map
from petsr_jax.sim.pose import Pose, SmoothField, draw_pose
from petsr_jax.sim.presets import REFERENCE_SLICE_MM, CohortSpec, grid_affine, grid_axes
from petsr_jax.sim.tissues import LABELS, draw_uptakes

_STREAMS = {"pose": 1, "uptake": 2, "lesions": 3, "counts": 4, "mr": 5, "scanner": 6}


def patient_id(index: int) -> str:
    return f"sub-{index + 1:03d}"


def _rng(seed: int, index: int, stream: str) -> np.random.Generator:
    """Independent random streams per patient and purpose (see module docstring)."""
    return np.random.default_rng([seed, index, _STREAMS[stream]])


@dataclasses.dataclass(frozen=True)
class _Acquisition:
    """A patient's count level and the shares of scatter and randoms in its prompts."""

    counts_per_slice: float
    scatter_fraction: float
    randoms_fraction: float

    @classmethod
    def draw(cls, rng: np.random.Generator, spec: CohortSpec) -> _Acquisition:
        low, high = spec.counts_per_slice
        counts_per_slice = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        counts_per_slice *= spec.slice_mm / REFERENCE_SLICE_MM
        scatter_fraction = float(rng.uniform(0.30, 0.40))
        randoms_fraction = float(rng.uniform(0.05, 0.15))
        return cls(counts_per_slice, scatter_fraction, randoms_fraction)


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
    pose = draw_pose(_rng(seed, index, "pose"))
    uptake_rng = _rng(seed, index, "uptake")
    uptakes, grey_to_white, grey_bqml = draw_uptakes(uptake_rng)
    metabolism = SmoothField.draw(uptake_rng, amplitude=0.08)
    lesions = draw_lesions(_rng(seed, index, "lesions"), spec, pose, load_atlas())

    truth_size = spec.truth_size
    fine = anatomy(pose, uptakes, metabolism, spec, truth_size)
    activity_fine = insert_lesions(fine.uptake * grey_bqml, lesions, spec, truth_size)
    count_rng = _rng(seed, index, "counts")
    acquisition = _Acquisition.draw(count_rng, spec)
    pet = _reconstructed_pet(activity_fine, fine.mu_per_cm, spec, acquisition, count_rng)

    to_output = truth_size // spec.size
    t1 = _t1(block_mean(fine.t1, to_output), spec, _rng(seed, index, "mr"))
    facts = {
        "patient_id": patient_id(index),
        "uptake_scale_bqml": round(grey_bqml, 2),
        "grey_to_white_ratio": round(grey_to_white, 4),
        **_acquisition_facts(acquisition, spec),
        **_pose_facts(pose),
        "relative_uptake": {k: round(v, 4) for k, v in sorted(uptakes.items())},
        "lesions": [dataclasses.asdict(lesion) for lesion in lesions],
    }
    return {
        "pet": pet.astype(np.float32),
        "activity": block_mean(activity_fine, to_output).astype(np.float32),
        "t1": t1,
        "mask": (block_mean(fine.brain, to_output) >= 0.5).astype(np.uint8),
        "labels": block_mode(fine.labels, to_output, len(LABELS)),
        "lesions": lesion_map(lesions, spec),
        "mu_per_cm": block_mean(fine.mu_per_cm, to_output).astype(np.float32),
        "geometry": {
            "spacing": spec.spacing,
            "affine": grid_affine(spec),
            "shape": (spec.n_slices, spec.size, spec.size),
        },
        "facts": facts,
    }


def _reconstructed_pet(
    activity_fine, mu_fine, spec: CohortSpec, acquisition: _Acquisition, rng
) -> np.ndarray:
    """The scan of the fine-grid truth: averaged onto the acquisition grid, acquired,
    reconstructed, and interpolated to the output matrix inside the field of view."""
    to_recon = spec.truth_size // spec.recon_size
    recon = acquire_and_reconstruct(
        block_mean(activity_fine, to_recon),
        block_mean(mu_fine, to_recon),
        spec,
        acquisition.counts_per_slice,
        acquisition.scatter_fraction,
        acquisition.randoms_fraction,
        rng,
    )
    return resize_in_plane(recon, spec.size) * scanner.fov_mask(spec.size)


def _t1(t1: np.ndarray, spec: CohortSpec, rng: np.random.Generator) -> np.ndarray:
    """The T1 as an MR scanner stores it: a smooth bias field, a global gain, Rician noise."""
    bias = SmoothField.draw(rng, amplitude=0.08)
    x, y, z = grid_axes(spec, spec.size)
    t1 = t1 * (1.0 + bias.on_grid(x, y, z)) * rng.uniform(0.9, 1.1)
    # Magnitude images have a Rician noise floor; scanners store integers (which also makes the
    # NIfTI file three times smaller than float noise would).
    return np.rint(np.abs(t1 + rng.normal(0.0, 4.0, t1.shape))).astype(np.float32)


def _acquisition_facts(acquisition: _Acquisition, spec: CohortSpec) -> dict[str, float]:
    return {
        "counts_per_slice": round(acquisition.counts_per_slice, 1),
        "total_counts": round(acquisition.counts_per_slice * spec.n_slices, 1),
        "scatter_fraction": round(acquisition.scatter_fraction, 4),
        "randoms_fraction": round(acquisition.randoms_fraction, 4),
    }


def _pose_facts(pose: Pose) -> dict[str, list[float]]:
    return {
        "head_scale": [round(float(s), 4) for s in pose.scale],
        "rotation_deg": [round(float(r), 3) for r in pose.rotation_deg],
        "shift_mm": [round(float(s), 3) for s in pose.shift_mm],
    }
