"""The Grain training pipeline: random access over cached slices → domain → crop/flip → batch.

The loader moves only high-resolution slices: the low-resolution input is made on the device by
`degrade()` inside the train step, so the host never becomes the bottleneck. An MR-guided run's
record also holds the slice's guidance channels (`guide`, full resolution, see
`petsr_jax.data.mr`), cropped and flipped with the PET as one record so the two stay aligned.
"""

from __future__ import annotations

import dataclasses
import os

import grain
import numpy as np

from petsr_jax.data.domain import to_domain


class SliceSource(grain.sources.RandomAccessDataSource):
    """Grain random access over the training slices of a cache (memory-mapped, picklable).

    A record is the `[H, W]` slice, or with guidance (`guide_path` / `guide`) the dict
    `{"hr": [H, W], "guide": [H, W, C]}` of the same slice.
    """

    def __init__(
        self,
        hr_path: str | os.PathLike | None = None,
        array: np.ndarray | None = None,
        *,
        guide_path: str | os.PathLike | None = None,
        guide: np.ndarray | None = None,
    ):
        self._path = None if hr_path is None else str(hr_path)
        self._array = array
        self._guide_path = None if guide_path is None else str(guide_path)
        self._guide = guide

    def _data(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self._path, mmap_mode="r", allow_pickle=False)
        return self._array

    def _guide_data(self) -> np.ndarray | None:
        if self._guide is None and self._guide_path is not None:
            self._guide = np.load(self._guide_path, mmap_mode="r", allow_pickle=False)
        return self._guide

    def __len__(self) -> int:
        return int(self._data().shape[0])

    def __getitem__(self, i):
        hr = np.asarray(self._data()[i], np.float32)
        guide = self._guide_data()
        if guide is None:
            return hr
        return {"hr": hr, "guide": np.asarray(guide[i], np.float32)}

    def __getstate__(self):
        # Workers re-open the memory maps rather than receiving the arrays through a pipe.
        state = dict(self.__dict__)
        if self._path is not None:
            state["_array"] = None
        if self._guide_path is not None:
            state["_guide"] = None
        return state


@dataclasses.dataclass(frozen=True)
class ToDomain(grain.transforms.Map):
    """One whole [H, W] slice into the network's domain (`to_domain`), before any crop: the
    paper's per-slice 8-bit scaling is of the whole slice, as the authors' images were."""

    domain: str = "physical"

    def map(self, element):
        if self.domain == "physical":
            return element
        if isinstance(element, dict):  # the PET only: guidance channels are not PET
            return {**element, "hr": to_domain(element["hr"][None], self.domain)[0][0]}
        return to_domain(element[None], self.domain)[0][0]


@dataclasses.dataclass(frozen=True)
class CropFlip(grain.transforms.RandomMap):
    """A random `crop_size` crop (0 = whole slice) and random flips of one [H, W] slice.

    Returns `{"hr": float32 [h, w, 1]}`. A record `{"hr": [H, W], "guide": [H, W, C]}` gets the
    one crop and the same flips on both, and returns `{"hr": [h, w, 1], "guide": [h, w, C]}`.
    Grain seeds the generator per record, so the augmentation of a record is the same after a
    restore.
    """

    crop_size: int = 0
    flip: bool = True

    def random_map(self, element, rng: np.random.Generator):
        arrays = dict(element) if isinstance(element, dict) else {"hr": element}
        if self.crop_size:
            h, w = arrays["hr"].shape[:2]
            y = rng.integers(0, h - self.crop_size + 1)
            x = rng.integers(0, w - self.crop_size + 1)
            arrays = {
                k: a[y : y + self.crop_size, x : x + self.crop_size] for k, a in arrays.items()
            }
        if self.flip:
            if rng.random() < 0.5:
                arrays = {k: a[::-1, :] for k, a in arrays.items()}
            if rng.random() < 0.5:
                arrays = {k: a[:, ::-1] for k, a in arrays.items()}
        record = {k: np.ascontiguousarray(a, np.float32) for k, a in arrays.items()}
        record["hr"] = record["hr"][..., None]
        return record


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
