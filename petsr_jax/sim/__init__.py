"""The embedded synthetic FDG-PET brain cohort and the PET simulation that makes it.

The paper's patient data are private; this package generates stand-in data stored as real scans
are, so the default path of every job reads DICOM and NIfTI like a user's own folder does.
"""

from petsr_jax.sim.cohort import (
    DEFAULT_ROOT_ENV,
    LABELS,
    PRESETS,
    CohortSpec,
    default_root,
    ensure_cohort,
    generate_cohort,
    generate_patient,
    save_montage,
)

__all__ = [
    "DEFAULT_ROOT_ENV",
    "LABELS",
    "PRESETS",
    "CohortSpec",
    "default_root",
    "ensure_cohort",
    "generate_cohort",
    "generate_patient",
    "save_montage",
]
