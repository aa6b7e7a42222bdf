"""A data root's patients: discovery, patient-level splits, and reading one patient's scans.

A data root holds one patient per entry (see README "Your own data"):

    <root>/<patient_id>/               a PET DICOM series (any nesting, any file names)
    <root>/<patient_id>.nii[.gz]       ... or a NIfTI PET volume
    <root>/masks/<patient_id>.nii.gz   optional brain mask on the PET grid
    <root>/t1/<patient_id>.nii.gz      optional co-registered T1 MR
    <root>/labels/<patient_id>.nii.gz  optional tissue labels (1 grey matter, 2 white matter)
    <root>/lesions/<patient_id>.nii.gz optional lesion labels 1..K
    <root>/split.json                  optional {"train": [...], "val": [...], "test": [...]}

Patients, never slices, are split into train / val / test, so no patient's anatomy is seen in
training and scored in test.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from petsr_jax import io
from petsr_jax.config import parse_split

AUX_FOLDERS = ("masks", "t1", "labels", "lesions")


class DataError(ValueError):
    """A data root or split that cannot be used; the message names the file and the problem."""


def _nifti_stem(name: str) -> str | None:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def list_patients(root: str | os.PathLike) -> dict[str, Path]:
    """Patient id → PET path (DICOM folder or NIfTI file) for every patient in `root`.

    A patient with two entries (`sub-002/` and `sub-002.nii.gz`) is a `DataError` naming both:
    which one is the patient's scan is the user's to say.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    found: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name in AUX_FOLDERS:
            continue
        if entry.is_dir():
            found.setdefault(entry.name, []).append(entry)
        elif (stem := _nifti_stem(entry.name)) is not None:
            found.setdefault(stem, []).append(entry)
    # `sub-002/` beside `sub-002.nii.gz` (or `.nii` beside `.nii.gz`): reading one of them
    # silently would drop the other, and nothing says which scan the patient is.
    ambiguous = {pid: entries for pid, entries in found.items() if len(entries) > 1}
    if ambiguous:
        listed = "; ".join(
            " and ".join(_entry_name(e) for e in entries) for entries in ambiguous.values()
        )
        raise DataError(
            f"{root}: {len(ambiguous)} patient(s) have more than one scan ({listed}); one "
            "patient is one DICOM folder or one NIfTI file: move or delete the others"
        )
    patients = {pid: entries[0] for pid, entries in found.items()}
    if not patients:
        raise DataError(
            f"data root {root} holds no patients: expected one DICOM folder or NIfTI file per "
            "patient (see README, 'Your own data')"
        )
    return patients


def _entry_name(entry: Path) -> str:
    """`sub-002/ (a DICOM folder)` or `sub-002.nii.gz`: a patient entry in a message."""
    return f"{entry.name}/ (a DICOM folder)" if entry.is_dir() else entry.name


def split_patients(
    patient_ids: list[str], counts: tuple[int, int, int], seed: int = 0, split_file: str = ""
) -> dict[str, list[str]]:
    """Patients of each split: from `split_file` when given, else a seeded draw of `counts`.

    Either way no patient is in two splits and every named patient exists.
    """
    ids = sorted(patient_ids)
    if split_file:
        try:
            split = json.loads(Path(split_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"split file {split_file}: {e}") from None
        missing_keys = {"train", "val", "test"} - set(split)
        if missing_keys:
            raise DataError(f"split file {split_file}: missing keys {sorted(missing_keys)}")
        split = {k: [str(p) for p in split[k]] for k in ("train", "val", "test")}
        unknown = sorted(set(sum(split.values(), [])) - set(ids))
        if unknown:
            raise DataError(f"split file {split_file}: unknown patients {unknown}")
    else:
        if sum(counts) > len(ids):
            raise DataError(_too_few_patients(counts, len(ids)))
        order = np.random.default_rng(seed).permutation(len(ids))
        n_train, n_val, n_test = counts
        pick = [ids[i] for i in order]
        split = {
            "train": sorted(pick[:n_train]),
            "val": sorted(pick[n_train : n_train + n_val]),
            "test": sorted(pick[n_train + n_val : n_train + n_val + n_test]),
        }
    seen = {}
    for name, members in split.items():
        for p in members:
            if p in seen:
                raise DataError(f"patient {p} is in both the {seen[p]} and {name} splits")
            seen[p] = name
    return split


def fitting_split(counts: tuple[int, int, int], num_patients: int) -> tuple[int, int, int] | None:
    """A split of `num_patients` in about the proportions of `counts`, or None when too few.

    Every part `counts` asks for keeps at least one patient (train always does); the rest go
    to the parts in proportion, leftovers to train. Used to suggest a split that works.
    """
    wanted = [max(c, 1) if i == 0 else c for i, c in enumerate(counts)]
    minimum = [1 if c else 0 for c in wanted]
    if num_patients < sum(minimum):
        return None
    share = [c * num_patients // sum(wanted) for c in wanted]
    fitted = [max(s, m) for s, m in zip(share, minimum, strict=True)]
    while sum(fitted) > num_patients:  # the minimums pushed it over: take from the largest
        largest = max(range(3), key=lambda i: (fitted[i] - minimum[i], -i))
        fitted[largest] -= 1
    fitted[0] += num_patients - sum(fitted)
    return tuple(fitted)  # type: ignore[return-value]


def _too_few_patients(counts: tuple[int, int, int], num_patients: int) -> str:
    """The error for a split larger than the data root, with a split that fits it."""
    problem = f"split {counts} needs {sum(counts)} patients but the data root has {num_patients}"
    fitted = fitting_split(counts, num_patients)
    if fitted is None:
        parts = [name for i, name in enumerate(("train", "val", "test")) if counts[i] or i == 0]
        return (
            f"{problem}; at least {len(parts)} are needed (one each for {', '.join(parts)}): "
            "add patients to the data root"
        )
    return f"{problem}; set data.split={'/'.join(map(str, fitted))} to use all of them"


@dataclasses.dataclass
class PatientScan:
    """One patient's PET volume with the optional maps on its grid."""

    patient_id: str
    volume: io.Volume
    mask: np.ndarray | None = None
    t1: np.ndarray | None = None
    labels: np.ndarray | None = None
    lesions: np.ndarray | None = None


def load_patient(root: str | os.PathLike, patient_id: str, path: Path) -> PatientScan:
    """Read a patient's PET and whichever of mask / T1 / labels / lesions exist."""
    volume = io.read_volume(path)
    bad = ~np.isfinite(volume.data)
    if bad.any():
        slices = sorted(set(np.nonzero(bad)[0].tolist()))
        raise DataError(
            f"patient {patient_id} ({path}): NaN or Inf in {len(slices)} slices: "
            f"{', '.join(_slice_names(volume, slices[:10]))}{', ...' if len(slices) > 10 else ''}"
            "; fix or leave out this patient before training"
        )
    aux = {}
    for folder in AUX_FOLDERS:
        for ext in (".nii.gz", ".nii"):
            f = Path(root) / folder / f"{patient_id}{ext}"
            if f.exists():
                arr, affine = io.read_nifti_array(f)
                if folder == "t1":
                    _check_t1_alignment(patient_id, arr, affine, volume, f)
                if arr.shape != volume.data.shape:
                    raise DataError(
                        f"{f}: shape {arr.shape} differs from the PET volume {volume.data.shape}"
                    )
                aux[folder] = arr
                break
    mask = aux.get("masks")
    return PatientScan(
        patient_id,
        volume,
        mask=None if mask is None else mask > 0,
        t1=aux.get("t1"),
        labels=aux.get("labels"),
        lesions=aux.get("lesions"),
    )


def _check_t1_alignment(patient_id, t1, affine, volume: io.Volume, path: Path) -> None:
    """A T1 off its PET's grid guides the network with the wrong anatomy: refused by name."""
    from petsr_jax.data.mr import check_alignment
    from petsr_jax.io.geometry import affine_in

    check_alignment(
        patient_id, t1.shape, affine, volume.data.shape, affine_in(volume, "RAS"), str(path)
    )


def _slice_names(volume: io.Volume, slices: list[int]) -> list[str]:
    """`"slice 4"`, with the DICOM file it came from when the volume has one per slice."""
    headers = volume.headers or []
    names = []
    for k in slices:
        source = (
            getattr(headers[k], "filename", None) if len(headers) == volume.data.shape[0] else None
        )
        names.append(f"slice {k} ({Path(source).name})" if source else f"slice {k}")
    return names


def resolve_root(config) -> Path:
    """The data root a config names, generating the embedded cohort when none is given."""
    if config.data.root:
        return Path(config.data.root)
    task, scanner = config.get("task", {}), config.get("scanner", {})
    if task.get("degradation") == "scanner" and scanner.get("data") == "phantoms":
        from petsr_jax.sim import phantoms

        return phantoms.ensure_phantoms(seed=config.data.cohort_seed, count=scanner.get("phantoms"))
    from petsr_jax.sim import cohort

    return cohort.ensure_cohort(config.data.cohort, seed=config.data.cohort_seed)


def resolve_split(config, root: Path) -> dict[str, list[str]]:
    """Patients per split for a config (an explicit split file wins, then `<root>/split.json`)."""
    split_file = config.data.split_file
    if not split_file and (root / "split.json").exists():
        split_file = str(root / "split.json")
    patients = list_patients(root)
    return split_patients(
        list(patients), parse_split(config.data.split), config.data.split_seed, split_file
    )
