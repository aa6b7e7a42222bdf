"""The tissue classes of the head: FDG uptake, attenuation, T1 intensity and label of each.

One table serves every map a patient has (PET truth, μ-map, T1, labels), so a structure drawn
once is consistent across all of them. Uptakes are relative to grey matter and vary per patient
(`draw_uptakes`); grey:white near 4 and the hot extra-cerebral structures follow typical
head-and-neck FDG SUV ratios.
"""

from __future__ import annotations

import dataclasses

import numpy as np

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


def draw_uptakes(rng: np.random.Generator) -> tuple[dict[str, float], float, float]:
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
