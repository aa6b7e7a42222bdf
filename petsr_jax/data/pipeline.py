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

from petsr_jax.data.domain import PHYSICAL, Domain


class SliceSource(grain.sources.RandomAccessDataSource):
    """Grain random access over the training slices of a cache (memory-mapped, picklable).

    A record is the `[H, W]` slice, or with extra channels the dict `{"hr": [H, W], "guide":
    [H, W, C], "context": [H, W, 2n], "lesion": [H, W]}` of the same slice: MR guidance
    (`guide_path` / `guide`), neighbouring slices (`context_path` / `context`) and the lesion map
    of a lesion-weighted loss (`lesion_path` / `lesion`), each present when given.
    """

    def __init__(
        self,
        hr_path: str | os.PathLike | None = None,
        array: np.ndarray | None = None,
        *,
        guide_path: str | os.PathLike | None = None,
        guide: np.ndarray | None = None,
        context_path: str | os.PathLike | None = None,
        context: np.ndarray | None = None,
        lesion_path: str | os.PathLike | None = None,
        lesion: np.ndarray | None = None,
    ):
        # name → (path of a .npy file to memory-map, or None; the array, or None until opened)
        self._arrays = {
            name: (None if path is None else str(path), array)
            for name, path, array in (
                ("hr", hr_path, array),
                ("guide", guide_path, guide),
                ("context", context_path, context),
                ("lesion", lesion_path, lesion),
            )
            if path is not None or array is not None
        }

    @classmethod
    def of(cls, slices) -> SliceSource:
        """The source of a `SliceSet`: its memory-mapped files where it has them, else arrays."""

        def split(array):
            path = getattr(array, "filename", None)
            return path, None if path is not None or array is None else np.asarray(array)

        hr_path, hr = split(slices.hr)
        guide_path, guide = split(getattr(slices, "guide", None))
        context_path, context = split(getattr(slices, "context", None))
        lesion_path, lesion = split(getattr(slices, "lesion", None))
        return cls(
            hr_path,
            hr,
            guide_path=guide_path,
            guide=guide,
            context_path=context_path,
            context=context,
            lesion_path=lesion_path,
            lesion=lesion,
        )

    def _data(self, name: str) -> np.ndarray:
        path, array = self._arrays[name]
        if array is None:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            self._arrays[name] = (path, array)
        return array

    def __len__(self) -> int:
        return int(self._data("hr").shape[0])

    def __getitem__(self, i):
        hr = np.asarray(self._data("hr")[i], np.float32)
        if len(self._arrays) == 1:
            return hr
        record = {"hr": hr}
        for name in self._arrays:
            if name != "hr":
                record[name] = np.asarray(self._data(name)[i], np.float32)
        return record

    def __getstate__(self):
        # Workers re-open the memory maps rather than receiving the arrays through a pipe.
        state = dict(self.__dict__)
        state["_arrays"] = {
            name: (path, None if path is not None else array)
            for name, (path, array) in self._arrays.items()
        }
        return state


@dataclasses.dataclass(frozen=True)
class ToDomain(grain.transforms.Map):
    """One whole [H, W] slice into the network's domain (`Domain.encode`), before any crop: the
    paper's per-slice 8-bit scaling is of the whole slice, as the authors' images were."""

    domain: Domain = PHYSICAL

    def map(self, element):
        if not self.domain.eight_bit:
            return element
        if isinstance(element, dict):  # the PET only (paper-domain runs have no context)
            return {**element, "hr": self.domain.encode(element["hr"][None])[0][0]}
        return self.domain.encode(element[None])[0][0]


@dataclasses.dataclass(frozen=True)
class CropFlip(grain.transforms.RandomMap):
    """A random `crop_size` crop (0 = whole slice) and random flips of one [H, W] slice.

    Returns `{"hr": float32 [h, w, 1]}`. A record with `guide` `[H, W, C]`, `context`
    `[H, W, 2n]` and/or `lesion` `[H, W]` gets the one crop and the same flips on all of them,
    which keep their channels.
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
    domain: Domain = PHYSICAL,
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
    if domain.eight_bit:
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
