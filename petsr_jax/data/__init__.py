"""From a data root to training batches and evaluation sets.

    patients.py   the data root's patients, patient-level splits, one patient's scans
    domain.py     per-volume normalisation and the network's data domain (physical | paper)
    slices.py     the slices of a split, read once and cached as `.npy` arrays
    pipeline.py   Grain: random access → domain → crop/flip → batch, checkpointable
    degrade.py    the one definition of "N× bicubic", used on the device

Everything a caller needs is importable from `petsr_jax.data` itself.
"""

from petsr_jax.data.degrade import degrade
from petsr_jax.data.domain import DOMAINS, PAPER, PHYSICAL, Domain, denormalise, normalise
from petsr_jax.data.patients import (
    AUX_FOLDERS,
    DataError,
    PatientScan,
    list_patients,
    load_patient,
    resolve_root,
    resolve_split,
    split_patients,
)
from petsr_jax.data.pipeline import CropFlip, SliceSource, ToDomain, train_dataset, train_iterator
from petsr_jax.data.slices import (
    BRAIN_AREA_FRACTION,
    INTENSITY_FRACTION,
    SliceSet,
    build_slice_set,
    cache_dir,
    cache_path_of,
    context_slices,
    eval_slice_indices,
    eval_slices_description,
)

__all__ = [
    "AUX_FOLDERS",
    "BRAIN_AREA_FRACTION",
    "DOMAINS",
    "PAPER",
    "PHYSICAL",
    "Domain",
    "INTENSITY_FRACTION",
    "CropFlip",
    "DataError",
    "PatientScan",
    "SliceSet",
    "SliceSource",
    "ToDomain",
    "build_slice_set",
    "cache_dir",
    "cache_path_of",
    "context_slices",
    "degrade",
    "denormalise",
    "eval_slice_indices",
    "eval_slices_description",
    "list_patients",
    "load_patient",
    "normalise",
    "resolve_root",
    "resolve_split",
    "split_patients",
    "train_dataset",
    "train_iterator",
]
