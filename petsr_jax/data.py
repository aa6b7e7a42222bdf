"""From a data root to training batches and evaluation sets.

A data root holds one patient per entry (see README "Your own data"):

    <root>/<patient_id>/               a PET DICOM series (any nesting, any file names)
    <root>/<patient_id>.nii[.gz]       ... or a NIfTI PET volume
    <root>/masks/<patient_id>.nii.gz   optional brain mask on the PET grid
    <root>/t1/<patient_id>.nii.gz      optional co-registered T1 MR
    <root>/labels/<patient_id>.nii.gz  optional tissue labels (1 grey matter, 2 white matter)
    <root>/lesions/<patient_id>.nii.gz optional lesion labels 1..K
    <root>/split.json                  optional {"train": [...], "val": [...], "test": [...]}

Patients, never slices, are split into train / val / test. Each volume is divided by its own
maximum (`normalise`), so every slice lies in [0, 1] and the factor, kept per slice, maps outputs
back to physical units (`denormalise`). What the network then sees depends on the run's
`data.domain` (`to_domain`): those slices as they are ("physical"), or each slice min–max scaled
to 8-bit levels as the paper's authors did ("paper"), inverted per slice by `from_domain`.
Training uses every slice; val and test use the brain slices only (`eval_slice_indices`), as
the paper kept 49 of 89.

The slices are read once and cached as `.npy` arrays (no pickle) keyed by the root's content,
so Grain worker processes memory-map them instead of each holding a copy. The loader moves only
high-resolution slices: the low-resolution input is made on the device by `degrade()`.
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

import grain
import numpy as np

from petsr_jax import io

AUX_FOLDERS = ("masks", "t1", "labels", "lesions")
# A slice is a "brain slice" when its brain-mask area is at least this fraction of the largest
# slice's (keeps ~49 of 89 slices of a whole-head scan, as the paper did).
BRAIN_AREA_FRACTION = 0.25
# Without a mask: slices whose mean intensity is at least this fraction of the brightest slice's.
INTENSITY_FRACTION = 0.5
CACHE_VERSION = "1"

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data root or split that cannot be used; the message names the file and the problem."""


def _nifti_stem(name: str) -> str | None:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def list_patients(root: str | os.PathLike) -> dict[str, Path]:
    """Patient id → PET path (DICOM folder or NIfTI file) for every patient in `root`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    patients = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name in AUX_FOLDERS:
            continue
        if entry.is_dir():
            patients[entry.name] = entry
        elif (stem := _nifti_stem(entry.name)) is not None:
            patients[stem] = entry
    if not patients:
        raise DataError(
            f"data root {root} holds no patients: expected one DICOM folder or NIfTI file per "
            "patient (see README, 'Your own data')"
        )
    return patients


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
            raise DataError(
                f"split {counts} needs {sum(counts)} patients but the data root has {len(ids)}; "
                "set data.split (e.g. data.split=2/1/1)"
            )
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


def normalise(data: np.ndarray) -> tuple[np.ndarray, float]:
    """`data / max(data)` and the factor: per-volume scaling into [0, 1], inverted by
    `denormalise`. Negative values (reconstruction undershoot) are kept, not clipped."""
    scale = float(np.max(data))
    if not np.isfinite(scale) or scale <= 0:
        raise DataError(f"cannot normalise a volume whose maximum is {scale}")
    return (data / scale).astype(np.float32), scale


def denormalise(normalised: np.ndarray, scale: float) -> np.ndarray:
    """Back to physical units: the inverse of `normalise`."""
    return np.asarray(normalised, np.float32) * np.float32(scale)


DOMAINS = ("physical", "paper")


def to_domain(slices: np.ndarray, domain: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`[N, H, W]` slices (any units) in the network's domain, and the per-slice `(low, span)`
    that `from_domain` inverts with: `slices ≈ low + span · encoded`.

    * "physical": unchanged (`low` 0, `span` 1); the caller has divided each volume by its
      maximum (`normalise`), which keeps the relative activity of slices and patients.
    * "paper": each slice min–max scaled to the 256 levels of an 8-bit image, divided by 255,
      as the authors' preprocessing did (`floor((x − min) · 256 / (max − min))` stored as
      uint8) — except that their brightest pixel, 256, overflowed to 0 and is 255 here. A
      constant slice becomes zeros. Per-slice scaling discards each slice's intensity, so a
      scan in any linear unit gives the same network input.
    """
    slices = np.asarray(slices, np.float32)
    count = slices.shape[0]
    if domain == "physical":
        return slices, np.zeros(count, np.float32), np.ones(count, np.float32)
    if domain != "paper":
        raise ValueError(f"data.domain: expected one of {DOMAINS}, got {domain!r}")
    low = slices.reshape(count, -1).min(axis=1) if count else np.zeros(0, np.float32)
    high = slices.reshape(count, -1).max(axis=1) if count else np.zeros(0, np.float32)
    span = (high - low).astype(np.float32)
    safe = np.where(span > 0, span, 1.0)[:, None, None]
    levels = np.floor((slices - low[:, None, None]) * (256.0 / safe))
    levels = np.where(span[:, None, None] > 0, np.clip(levels, 0, 255), 0)
    # Level k holds the values in [k, k + 1) · span / 256; k / 255 · span is within half a
    # level of that band's middle for every k, so `from_domain` maps level 255 back to `high`.
    return (levels / 255.0).astype(np.float32), low.astype(np.float32), span


def from_domain(encoded: np.ndarray, low: np.ndarray, span: np.ndarray) -> np.ndarray:
    """Slices back from the network's domain: `low + span · encoded`, per slice (`to_domain`)."""
    encoded = np.asarray(encoded, np.float32)
    shape = (-1,) + (1,) * (encoded.ndim - 1)
    return (
        np.asarray(low, np.float32).reshape(shape)
        + np.asarray(span, np.float32).reshape(shape) * encoded
    )


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
                arr, _ = io.read_nifti_array(f)
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
    from petsr_jax import cohort

    return cohort.ensure_cohort(config.data.cohort, seed=config.data.cohort_seed)


def resolve_split(config, root: Path) -> dict[str, list[str]]:
    """Patients per split for a config (an explicit split file wins, then `<root>/split.json`)."""
    from petsr_jax.config import parse_split

    split_file = config.data.split_file
    if not split_file and (root / "split.json").exists():
        split_file = str(root / "split.json")
    patients = list_patients(root)
    return split_patients(
        list(patients), parse_split(config.data.split), config.data.split_seed, split_file
    )


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

    def __len__(self) -> int:
        return int(self.hr.shape[0])


def _cache_key(root: Path, patient_ids: list[str], rule: str, eval_split: bool) -> str:
    """Content key of a split's slice cache: the files' names, sizes and times, and the rule."""
    h = hashlib.sha1(f"{CACHE_VERSION}|{root.resolve()}|{rule}|{eval_split}".encode())
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
    root: Path, patient_ids: list[str], *, eval_split: bool, rule: str = "mask", cache: bool = True
) -> SliceSet:
    """The slices of `patient_ids` (all of them for training, brain slices for evaluation)."""
    key = _cache_key(root, patient_ids, rule, eval_split)
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
        )
    patients = list_patients(root)
    hr, masks, pids, idx, scales, units = [], [], [], [], [], set()
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
    shapes = {a.shape[1:] for a in hr}
    if len(shapes) > 1:
        raise DataError(f"patients in {root} have different slice sizes {sorted(shapes)}")
    has_mask = all(m is not None for m in masks)
    result = SliceSet(
        np.concatenate(hr),
        np.concatenate(masks) if has_mask else None,
        np.array(pids),
        np.array(idx),
        np.array(scales, np.float32),
        units.pop() if len(units) == 1 else "mixed",
    )
    if cache:
        _write_cache(folder, result)
    return result


def _write_cache(folder: Path, s: SliceSet) -> None:
    # Unique across hosts: the processes of a multi-host run may share this folder and a pid.
    tmp = folder.with_name(f"{folder.name}.tmp{uuid.uuid4().hex}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "hr.npy", s.hr, allow_pickle=False)
    if s.mask is not None:
        np.save(tmp / "mask.npy", s.mask, allow_pickle=False)
    index = {
        "patient": s.patient.tolist(),
        "slice_index": s.slice_index.tolist(),
        "scale": s.scale.tolist(),
        "units": s.units,
        "has_mask": s.mask is not None,
    }
    (tmp / "index.json").write_text(json.dumps(index))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same cache first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


class SliceSource(grain.sources.RandomAccessDataSource):
    """Grain random access over the training slices of a cache (memory-mapped, picklable)."""

    def __init__(self, hr_path: str | os.PathLike | None = None, array: np.ndarray | None = None):
        self._path = None if hr_path is None else str(hr_path)
        self._array = array

    def _data(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self._path, mmap_mode="r", allow_pickle=False)
        return self._array

    def __len__(self) -> int:
        return int(self._data().shape[0])

    def __getitem__(self, i):
        return np.asarray(self._data()[i], np.float32)

    def __getstate__(self):
        # Workers re-open the memory map rather than receiving the array through a pipe.
        state = dict(self.__dict__)
        if self._path is not None:
            state["_array"] = None
        return state


@dataclasses.dataclass(frozen=True)
class ToDomain(grain.transforms.Map):
    """One whole [H, W] slice into the network's domain (`to_domain`), before any crop: the
    paper's per-slice 8-bit scaling is of the whole slice, as the authors' images were."""

    domain: str = "physical"

    def map(self, element):
        if self.domain == "physical":
            return element
        return to_domain(element[None], self.domain)[0][0]


@dataclasses.dataclass(frozen=True)
class CropFlip(grain.transforms.RandomMap):
    """A random `crop_size` crop (0 = whole slice) and random flips of one [H, W] slice.

    Returns `{"hr": float32 [h, w, 1]}`. Grain seeds the generator per record, so the
    augmentation of a record is the same after a restore.
    """

    crop_size: int = 0
    flip: bool = True

    def random_map(self, element, rng: np.random.Generator):
        hr = element
        if self.crop_size:
            h, w = hr.shape
            y = rng.integers(0, h - self.crop_size + 1)
            x = rng.integers(0, w - self.crop_size + 1)
            hr = hr[y : y + self.crop_size, x : x + self.crop_size]
        if self.flip:
            if rng.random() < 0.5:
                hr = hr[::-1, :]
            if rng.random() < 0.5:
                hr = hr[:, ::-1]
        return {"hr": np.ascontiguousarray(hr, np.float32)[..., None]}


def train_dataset(
    source,
    *,
    batch_size: int,
    seed: int,
    crop_size: int = 0,
    flip: bool = True,
    domain: str = "physical",
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Infinite, per-epoch reshuffled, augmented, batched training records of one process.

    `batch_size` is the global batch. The shuffled, augmented stream is cut into blocks of
    `batch_size / P` records and process p takes blocks p, p + P, ...: its step-t batch is the
    p-th block of the single-process step-t batch, crops and flips included, so the processes'
    batches laid side by side on the `data` mesh are that batch exactly, whatever P is.
    """
    if batch_size % process_count:
        raise ValueError(f"global batch {batch_size} not divisible by {process_count} processes")
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    # Augment before selecting this process's records: Grain seeds each record's augmentation
    # by its index in the dataset it is applied to, which must be the global stream's index.
    # The dataset is lazy, so records of other processes are never read or augmented here.
    if domain != "physical":
        ds = ds.map(ToDomain(domain))
    ds = ds.random_map(CropFlip(crop_size, flip), seed=seed)
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
    return ds[process_index::process_count]


def train_iterator(ds: grain.MapDataset, num_workers: int = 0):
    """A checkpointable iterator (`get_state`/`set_state`) over `train_dataset` batches."""
    it_ds = ds.to_iter_dataset()
    if num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it_ds)


def cache_path_of(slices: SliceSet) -> str | None:
    """The `.npy` file behind a memory-mapped slice array (None for in-memory arrays)."""
    return getattr(slices.hr, "filename", None)
