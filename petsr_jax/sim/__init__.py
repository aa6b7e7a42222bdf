"""The embedded synthetic FDG-PET brain cohort and the PET simulation that makes it.

The paper's patient data are private; this package generates stand-in data stored as real scans
are, so the default path of every job reads DICOM and NIfTI as it would a user's own folder.
Its modules, from the bottom up:

    presets      cohort sizes and scanner settings (`CohortSpec`, `PRESETS`) and their grid
    tissues      uptake, attenuation, T1 and label of each tissue class (`LABELS`)
    shapes       the head outside the brain: shells and analytic structures
    atlas        the MNI152 brain from the maps nilearn ships
    pose         a patient's head pose, size and smooth warp
    anatomy      one patient's uptake, μ, T1 and label maps
    lesions      hot and cold lesions: drawn, inserted, labelled
    scanner      the 2D PET projector and PSF-OSEM
    acquisition  truth → counts → reconstruction → display matrix
    patient      one patient, deterministic from a seed
    cohort       patients written as DICOM + NIfTI, cached per preset, seed and version
    montage      a PNG of a written cohort

Only `petsr_jax.io` and `petsr_jax.volume` are used from the rest of the package.
"""

from petsr_jax.sim.cohort import (
    DEFAULT_ROOT_ENV,
    GENERATOR,
    VERSION,
    default_root,
    ensure_cohort,
    generate_cohort,
    write_patient,
)
from petsr_jax.sim.lesions import lesion_map
from petsr_jax.sim.montage import save_montage
from petsr_jax.sim.patient import generate_patient, patient_id
from petsr_jax.sim.presets import PRESETS, CohortSpec, grid_affine, grid_axes
from petsr_jax.sim.tissues import LABELS

__all__ = [
    "DEFAULT_ROOT_ENV",
    "GENERATOR",
    "LABELS",
    "PRESETS",
    "VERSION",
    "CohortSpec",
    "default_root",
    "ensure_cohort",
    "generate_cohort",
    "generate_patient",
    "grid_affine",
    "grid_axes",
    "lesion_map",
    "patient_id",
    "save_montage",
    "write_patient",
]
