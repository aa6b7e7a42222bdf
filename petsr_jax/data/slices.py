"""Evaluation and training slice sets, read once and cached as `.npy` arrays.

Training uses every slice; val and test use the brain slices only (`eval_slice_indices`), as
the paper kept 49 of 89. The slices are cached without pickle, keyed by the root's content, so
Grain worker processes memory-map them instead of each holding a copy. An MR-guided run's
slice sets also carry each slice's guidance channels (`guide`: the normalised T1, and the
radial and axial positions when asked; see `petsr_jax.data.mr`), cached the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import uuid
from pathlib import Path

import numpy as np

from petsr_jax.data import mr
from petsr_jax.data.domain import normalise
from petsr_jax.data.patients import AUX_FOLDERS, DataError, list_patients, load_patient

# A slice is a "brain slice" when its brain-mask area is at least this fraction of the largest
# slice's (keeps ~49 of 89 slices of a whole-head scan, as the paper did).
BRAIN_AREA_FRACTION = 0.25
# Without a mask: slices whose mean intensity is at least this fraction of the brightest slice's.
INTENSITY_FRACTION = 0.5
CACHE_VERSION = "3"  # 2: the index records the pixel spacing; 3: one pixel spacing per set
# Largest relative difference between two patients' pixel spacings still "one spacing" (DICOM
# stores spacings as decimal strings, NIfTI as float32: equal spacings differ in the last digits).
SPACING_TOLERANCE = 0.01

log = logging.getLogger(__name__)


def eval_slice_indices(data: np.ndarray, mask: np.ndarray | None, rule: str) -> np.ndarray:
    """Slices used for validation and test.

    "mask": slices whose brain-mask area is ≥ 25 % of the largest slice's; without a mask,
    slices whose mean intensity is ≥ 50 % of the brightest slice's. "all": every slice.
    "start:stop": that range of slice indices.
    """
    n = data.shape[0]
    if rule == "all":
        return np.arange(n)
    if re.fullmatch(r"\d+:\d+", rule):
        start, stop = (int(x) for x in rule.split(":"))
        return np.arange(start, min(stop, n))
    if mask is not None:
        area = mask.reshape(n, -1).sum(axis=1).astype(np.float64)
        return np.flatnonzero(area >= BRAIN_AREA_FRACTION * area.max())
    mean = data.reshape(n, -1).mean(axis=1)
    return np.flatnonzero(mean >= INTENSITY_FRACTION * mean.max())


def eval_slices_description(rule: str, has_mask: bool) -> str:
    """In words, which slices `eval_slice_indices` keeps under `rule`, for logs and results."""
    if rule == "all":
        return "every slice"
    if re.fullmatch(r"\d+:\d+", rule):
        start, stop = (int(x) for x in rule.split(":"))
        return f"slices {start} to {stop - 1}"
    if has_mask:
        return f"slices whose brain-mask area is ≥ {BRAIN_AREA_FRACTION:.0%} of the largest slice's"
    return f"slices whose mean intensity is ≥ {INTENSITY_FRACTION:.0%} of the brightest slice's"


def context_slices(volume: np.ndarray, keep: np.ndarray, neighbours: int) -> np.ndarray:
    """`[len(keep), H, W, 2·neighbours]` neighbours of the slices `keep` of a `[D, H, W]`
    volume, ordered `-n … -1, +1 … +n`, the volume's edges reflected (slice −1 is slice 1).

    A volume of one slice is its own neighbour.
    """
    volume = np.asarray(volume, np.float32)
    depth = volume.shape[0]
    keep = np.asarray(keep, int)
    offsets = [o for o in range(-neighbours, neighbours + 1) if o != 0]
    if not offsets:
        return np.zeros(volume[keep].shape + (0,), np.float32)
    planes = []
    for o in offsets:
        index = keep + o
        if depth > 1:
            period = 2 * (depth - 1)
            index = np.mod(index, period)
            index = np.where(index >= depth, period - index, index)
        else:
            index = np.zeros_like(index)
        planes.append(volume[index])
    return np.ascontiguousarray(np.stack(planes, axis=-1), np.float32)


@dataclasses.dataclass
class SliceSet:
    """High-resolution slices of one split, normalised, with what evaluation needs.

    `hr` and `mask` may be memory-mapped `.npy` arrays. All arrays are indexed by slice.
    """

    hr: np.ndarray  # float32 [N, H, W], each volume / its maximum
    mask: np.ndarray | None  # bool [N, H, W] brain mask, or None where no patient has one
    patient: np.ndarray  # str [N] patient id
    slice_index: np.ndarray  # int [N] index in the patient's volume
    scale: np.ndarray  # float32 [N] the volume's normalisation factor (physical = hr * scale)
    units: str = "unknown"
    # float32 [N, H, W, C] MR guidance channels (`mr.guide_slices`), or None for a PET-only run.
    guide: np.ndarray | None = None
    # In-plane pixel size in mm (row, column), the median over patients: what enhancement
    # compares a new scan's pixels with (the networks learn details at this size).
    pixel_spacing: tuple[float, float] | None = None
    # float32 [N, H, W, 2n] each slice's n neighbours on each side in its volume
    # (`context_slices`), or None when the task needs none (2D, bicubic).
    context: np.ndarray | None = None
    # Distance between slices in mm, the median over patients (a scanner PSF is in mm).
    slice_spacing: float | None = None
    # uint8 [N, H, W] 1 inside a lesion (`<root>/lesions/`), or None: what a lesion-weighted
    # loss (`train.lesion_weight`) weighs.
    lesion: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.hr.shape[0])

    @property
    def voxel_spacing(self) -> tuple[float, float, float] | None:
        """(slice, row, column) spacing in mm, or None when the data did not say; a cache
        written before slice spacings were recorded takes the pixel size for the slice's."""
        if self.pixel_spacing is None:
            return None
        return (self.slice_spacing or float(np.mean(self.pixel_spacing)),) + tuple(
            self.pixel_spacing
        )


def _cache_key(
    root: Path,
    patient_ids: list[str],
    rule: str,
    eval_split: bool,
    guidance: tuple[str, ...] = (),
    neighbours: int = 0,
    lesions: bool = False,
) -> str:
    """Content key of a split's slice cache: the files' names, sizes and times, the rule, the
    MR guidance channels and the neighbouring slices kept (a PET-only 2D run's key is what it
    was before those existed)."""
    h = hashlib.sha1(f"{CACHE_VERSION}|{root.resolve()}|{rule}|{eval_split}".encode())
    if guidance:
        h.update(f"|guide:{','.join(guidance)}".encode())
    if neighbours:
        h.update(f"|neighbours:{neighbours}".encode())
    if lesions:
        h.update(b"|lesions")
    patients = list_patients(root)
    for pid in sorted(patient_ids):
        paths = [patients[pid]] + [root / f / f"{pid}.nii.gz" for f in AUX_FOLDERS]
        for p in paths:
            files = sorted(p.rglob("*")) if p.is_dir() else [p]
            for f in files:
                if f.is_file():
                    st = f.stat()
                    h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Where slice caches live: `$PETSR_CACHE_DIR` or `~/.cache/petsr_jax/slices`."""
    return Path(os.environ.get("PETSR_CACHE_DIR", Path.home() / ".cache" / "petsr_jax" / "slices"))


def build_slice_set(
    root: Path,
    patient_ids: list[str],
    *,
    eval_split: bool,
    rule: str = "mask",
    cache: bool = True,
    guidance: tuple[str, ...] = (),
    neighbours: int = 0,
    lesions: bool = False,
) -> SliceSet:
    """The slices of `patient_ids` (all of them for training, brain slices for evaluation).

    `guidance` (`mr.guidance_channels(config)`) adds each slice's MR guidance channels; then
    every patient must have a T1 on its PET's grid, or a `DataError` names the patient.
    `neighbours` (`Task.neighbours`) adds each slice's neighbours in its volume (`context`),
    taken from the whole volume, so an evaluation slice at the edge of the kept range still
    sees its true neighbours. `lesions` adds each slice's lesion map (`lesion`); then every
    patient must have one.
    """
    key = _cache_key(root, patient_ids, rule, eval_split, guidance, neighbours, lesions)
    folder = cache_dir() / key
    if cache and (folder / "index.json").exists():
        index = json.loads((folder / "index.json").read_text())
        hr = np.load(folder / "hr.npy", mmap_mode="r", allow_pickle=False)
        mask = (
            np.load(folder / "mask.npy", mmap_mode="r", allow_pickle=False)
            if index["has_mask"]
            else None
        )
        return SliceSet(
            hr,
            mask,
            np.array(index["patient"]),
            np.array(index["slice_index"]),
            np.array(index["scale"], np.float32),
            index["units"],
            guide=(
                np.load(folder / "guide.npy", mmap_mode="r", allow_pickle=False)
                if index.get("has_guide")
                else None
            ),
            pixel_spacing=_spacing_or_none(index["pixel_spacing"]),
            context=(
                np.load(folder / "context.npy", mmap_mode="r", allow_pickle=False)
                if index.get("has_context")
                else None
            ),
            slice_spacing=index.get("slice_spacing"),
            lesion=(
                np.load(folder / "lesion.npy", mmap_mode="r", allow_pickle=False)
                if index.get("has_lesion")
                else None
            ),
        )
    patients = list_patients(root)
    hr, masks, pids, idx, scales, units, spacings, guides = [], [], [], [], [], set(), [], []
    contexts, slice_spacings, lesion_maps = [], [], []
    for pid in sorted(patient_ids):
        scan = load_patient(root, pid, patients[pid])
        data, scale = normalise(scan.volume.data)
        keep = (
            eval_slice_indices(scan.volume.data, scan.mask, rule)
            if eval_split
            else np.arange(data.shape[0])
        )
        hr.append(data[keep])
        masks.append(scan.mask[keep] if scan.mask is not None else None)
        pids += [pid] * len(keep)
        idx += keep.tolist()
        scales += [scale] * len(keep)
        units.add(scan.volume.units)
        spacings.append(scan.volume.spacing[1:])
        slice_spacings.append(scan.volume.spacing[0])
        if neighbours:
            contexts.append(context_slices(data, keep, neighbours))
        if guidance:
            guides.append(_guide_of(scan, root, keep, guidance))
        if lesions:
            if scan.lesions is None:
                raise DataError(
                    f"patient {pid} has no lesion map ({root / 'lesions' / f'{pid}.nii.gz'}); "
                    "a lesion-weighted loss (train.lesion_weight) needs one for every training "
                    "patient"
                )
            lesion_maps.append((scan.lesions[keep] > 0).astype(np.uint8))
    shapes = {a.shape[1:] for a in hr}
    if len(shapes) > 1:
        raise DataError(f"patients in {root} have different slice sizes {sorted(shapes)}")
    check_one_spacing(root, dict(zip(sorted(patient_ids), spacings, strict=True)))
    has_mask = all(m is not None for m in masks)
    result = SliceSet(
        np.concatenate(hr),
        np.concatenate(masks) if has_mask else None,
        np.array(pids),
        np.array(idx),
        np.array(scales, np.float32),
        units.pop() if len(units) == 1 else "mixed",
        guide=np.concatenate(guides) if guidance else None,
        pixel_spacing=_spacing_or_none(np.median(spacings, axis=0).tolist() if spacings else None),
        context=np.concatenate(contexts) if neighbours else None,
        slice_spacing=float(np.median(slice_spacings)) if slice_spacings else None,
        lesion=np.concatenate(lesion_maps) if lesions else None,
    )
    if cache:
        _write_cache(folder, result)
    return result


def _mm(spacing) -> str:
    return f"{spacing[0]:.4g} × {spacing[1]:.4g} mm"


def check_one_spacing(root: Path, spacing_of: dict[str, tuple[float, float]]) -> None:
    """Refuse patients whose in-plane pixel spacings differ by more than `SPACING_TOLERANCE`.

    The networks learn structures of a size in pixels, and `data_info.json` records one spacing
    that enhancement compares new scans with: a median of 4.69 and 7.03 mm would record a
    spacing no patient has. The message names each spacing with its patients and the fix.
    """
    groups: list[tuple[tuple[float, float], list[str]]] = []
    for pid, spacing in spacing_of.items():
        for reference, members in groups:
            if all(
                abs(s / r - 1) <= SPACING_TOLERANCE for s, r in zip(spacing, reference, strict=True)
            ):
                members.append(pid)
                break
        else:
            groups.append((tuple(float(s) for s in spacing), [pid]))
    if len(groups) < 2:
        return
    listed = " and ".join(
        f"{_mm(spacing)} ({', '.join(members[:4])}{', ...' if len(members) > 4 else ''})"
        for spacing, members in groups
    )
    raise DataError(
        f"patients in {root} have different pixel spacings: {listed}, more than "
        f"{SPACING_TOLERANCE:.0%} apart; the networks learn structures in pixels, so resample "
        "the scans to one spacing first (petsr_jax.io.resample(volume, spacing_mm), then "
        "petsr_jax.io.write_nifti), or train on the patients of one spacing"
    )


def check_run_sets(root: Path, batch_size: int, **sets: SliceSet) -> None:
    """What one run's slice sets (train=, val=, test=) must agree on, said before training.

    `check_one_spacing` across the sets: each set has one spacing already, and a test patient
    at another pixel size is as wrong as a training patient at one. A training patient of a
    single slice (a 2D image, not a volume) is a warning: it adds one slice, so the run has
    fewer steps per epoch than a volume would give (slices // batch size), which nothing else
    would say.
    """
    spacing_of = {
        f"{name} patient {s.patient[0]}": s.pixel_spacing
        for name, s in sets.items()
        if s.pixel_spacing is not None and len(s)
    }
    check_one_spacing(root, spacing_of)
    train = sets.get("train")
    if train is None or not len(train):
        return
    patients, counts = np.unique(train.patient, return_counts=True)
    single = [str(p) for p, n in zip(patients, counts, strict=True) if n == 1]
    if single:
        total = len(train)
        log.warning(
            "%s: training patient(s) %s hold a single slice (a 2D image, not a volume); the "
            "train split has %d slices, %d steps of train.batch_size=%d per epoch%s",
            root,
            ", ".join(single),
            total,
            total // batch_size,
            batch_size,
            f", {total % batch_size} slice(s) left out of each epoch" if total % batch_size else "",
        )


def _write_cache(folder: Path, s: SliceSet) -> None:
    # Unique across hosts: the processes of a multi-host run may share this folder and a pid.
    tmp = folder.with_name(f"{folder.name}.tmp{uuid.uuid4().hex}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "hr.npy", s.hr, allow_pickle=False)
    if s.mask is not None:
        np.save(tmp / "mask.npy", s.mask, allow_pickle=False)
    if s.guide is not None:
        np.save(tmp / "guide.npy", s.guide, allow_pickle=False)
    if s.context is not None:
        np.save(tmp / "context.npy", s.context, allow_pickle=False)
    if s.lesion is not None:
        np.save(tmp / "lesion.npy", s.lesion, allow_pickle=False)
    index = {
        "patient": s.patient.tolist(),
        "slice_index": s.slice_index.tolist(),
        "scale": s.scale.tolist(),
        "units": s.units,
        "has_mask": s.mask is not None,
        "has_guide": s.guide is not None,
        "pixel_spacing": s.pixel_spacing,
        "has_context": s.context is not None,
        "slice_spacing": s.slice_spacing,
        "has_lesion": s.lesion is not None,
    }
    (tmp / "index.json").write_text(json.dumps(index))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same cache first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _guide_of(scan, root: Path, keep: np.ndarray, guidance: tuple[str, ...]) -> np.ndarray:
    """The guidance channels of a patient's kept slices; a missing T1 is an error by name."""
    if scan.t1 is None:
        raise DataError(
            f"patient {scan.patient_id} has no T1 MR ({root / 't1' / scan.patient_id}.nii.gz): "
            "an MR-guided run (mr.t1) needs a co-registered T1 for every patient"
        )
    t1 = mr.normalise_t1(scan.t1, source=str(root / "t1" / f"{scan.patient_id}.nii.gz"))
    return mr.guide_slices(t1[keep], keep, t1.shape[0], guidance)


def _spacing_or_none(spacing) -> tuple[float, float] | None:
    return None if spacing is None else (float(spacing[0]), float(spacing[1]))


def cache_path_of(slices: SliceSet) -> str | None:
    """The `.npy` file behind a memory-mapped slice array (None for in-memory arrays)."""
    return getattr(slices.hr, "filename", None)
