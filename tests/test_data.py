"""Data root, splits, normalisation, evaluation slices and the Grain training pipeline."""

import json
import re

import numpy as np
import pytest

from petsr_jax import data


def test_patients_are_listed_from_folders_and_nifti_files(nifti_root):
    patients = data.list_patients(nifti_root)
    assert sorted(patients) == ["pat-00", "pat-01", "pat-02", "pat-03"]  # masks/ is not a patient


def test_split_is_by_patient_seeded_and_disjoint():
    ids = [f"p{i}" for i in range(33)]
    a = data.split_patients(ids, (20, 4, 9), seed=0)
    assert [len(a[k]) for k in ("train", "val", "test")] == [20, 4, 9]
    assert not set(a["train"]) & set(a["val"]) and not set(a["train"]) & set(a["test"])
    assert not set(a["val"]) & set(a["test"])
    assert a == data.split_patients(ids, (20, 4, 9), seed=0)
    assert a != data.split_patients(ids, (20, 4, 9), seed=1)


def test_split_file_wins_and_is_checked(tmp_path):
    ids = ["a", "b", "c", "d"]
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"train": ["a", "b"], "val": ["c"], "test": ["d"]}))
    assert data.split_patients(ids, (1, 1, 1), split_file=str(f))["test"] == ["d"]
    f.write_text(json.dumps({"train": ["a", "b"], "val": ["b"], "test": ["d"]}))
    with pytest.raises(data.DataError, match="patient b is in both"):
        data.split_patients(ids, (1, 1, 1), split_file=str(f))
    f.write_text(json.dumps({"train": ["a", "zz"], "val": ["c"], "test": ["d"]}))
    with pytest.raises(data.DataError, match="unknown patients"):
        data.split_patients(ids, (1, 1, 1), split_file=str(f))
    with pytest.raises(data.DataError, match="needs 5 patients"):
        data.split_patients(ids, (3, 1, 1))


@pytest.mark.parametrize(
    ("counts", "num_patients"), [((2, 1, 1), 3), ((20, 4, 9), 10), ((20, 4, 9), 32), ((5, 0, 1), 2)]
)
def test_too_few_patients_suggests_a_split_that_works(counts, num_patients):
    from petsr_jax.config import parse_split

    ids = [f"p{i}" for i in range(num_patients)]
    with pytest.raises(data.DataError, match=r"data\.split=(\d+/\d+/\d+)") as error:
        data.split_patients(ids, counts)
    suggested = re.search(r"data\.split=(\S+) ", str(error.value)).group(1)
    fitted = parse_split(suggested)
    assert fitted != counts and sum(fitted) == num_patients
    split = data.split_patients(ids, fitted)
    for name, wanted in zip(("train", "val", "test"), counts, strict=True):
        assert len(split[name]) >= min(wanted, 1)


def test_too_few_patients_for_any_split_says_so():
    with pytest.raises(data.DataError, match="at least 3 are needed") as error:
        data.split_patients(["a", "b"], (2, 1, 1))
    assert "data.split=" not in str(error.value)


def test_normalisation_is_invertible_and_bounded():
    vol = np.random.default_rng(0).uniform(-10, 5e4, (4, 8, 8)).astype(np.float32)
    norm, scale = data.normalise(vol)
    assert norm.max() == 1.0 and norm.dtype == np.float32
    np.testing.assert_allclose(data.denormalise(norm, scale), vol, rtol=1e-6)
    with pytest.raises(data.DataError):
        data.normalise(np.zeros((2, 2, 2)))


def test_eval_slices_follow_the_mask_or_a_range():
    vol = np.ones((10, 8, 8), np.float32)
    mask = np.zeros((10, 8, 8), bool)
    mask[3:7, 2:6, 2:6] = True
    mask[2, 3, 3] = True  # a sliver: below 25 % of the largest area
    assert data.eval_slice_indices(vol, mask, "mask").tolist() == [3, 4, 5, 6]
    assert data.eval_slice_indices(vol, mask, "2:5").tolist() == [2, 3, 4]
    assert len(data.eval_slice_indices(vol, None, "all")) == 10


def test_slice_sets_hold_every_train_slice_and_brain_val_slices(nifti_root):
    train = data.build_slice_set(nifti_root, ["pat-00", "pat-01"], eval_split=False)
    val = data.build_slice_set(nifti_root, ["pat-02"], eval_split=True)
    assert train.hr.shape == (16, 32, 32) and set(train.patient) == {"pat-00", "pat-01"}
    assert val.mask is not None and len(val) == 6  # mask covers slices 2..7
    assert float(np.max(train.hr)) == pytest.approx(1.0)
    # Cached arrays come back memory-mapped and equal.
    again = data.build_slice_set(nifti_root, ["pat-00", "pat-01"], eval_split=False)
    assert data.cache_path_of(again) is not None
    np.testing.assert_array_equal(np.asarray(again.hr), np.asarray(train.hr))


def test_nan_in_a_scan_is_reported_before_training(tmp_path):
    import nibabel as nib

    vol = np.ones((8, 8, 4), np.float32)
    vol[1, 1, 2] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match=r"bad\.nii\.gz.*(NaN|nan)|(NaN|nan).*bad"):
        data.load_patient(tmp_path, "bad", tmp_path / "bad.nii.gz")


def _batches(ds, n, state=None):
    it = data.train_iterator(ds)
    if state is not None:
        it.set_state(state)
    return [next(it)["hr"] for _ in range(n)], it


def test_training_batches_have_shape_and_reshuffle_across_epochs():
    slices = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((8, 6, 6), np.float32)
    ds = data.train_dataset(data.SliceSource(array=slices), batch_size=4, seed=0, flip=False)
    batches, _ = _batches(ds, 4)
    assert batches[0].shape == (4, 6, 6, 1)
    order = [b[:, 0, 0, 0].tolist() for b in batches]
    epoch0, epoch1 = sorted(order[0] + order[1]), sorted(order[2] + order[3])
    assert epoch0 == epoch1 == list(range(8))  # every slice once per epoch
    assert order[0] + order[1] != order[2] + order[3]  # in a new order


def test_crops_and_restored_iterator_give_the_same_next_batch():
    rng = np.random.default_rng(0)
    slices = rng.uniform(size=(10, 16, 16)).astype(np.float32)
    ds = data.train_dataset(data.SliceSource(array=slices), batch_size=2, seed=3, crop_size=8)
    first, it = _batches(ds, 3)
    assert first[0].shape == (2, 8, 8, 1)
    state = it.get_state()
    expected = next(it)["hr"]
    (resumed,), _ = _batches(ds, 1, state=state)
    np.testing.assert_array_equal(resumed, expected)


def test_processes_together_read_exactly_the_single_process_batch():
    slices = np.arange(12, dtype=np.float32)[:, None, None] * np.ones((12, 4, 4), np.float32)
    src = data.SliceSource(array=slices)
    single, _ = _batches(data.train_dataset(src, batch_size=4, seed=1, flip=False), 3)
    parts = [
        _batches(
            data.train_dataset(
                src, batch_size=4, seed=1, flip=False, process_index=p, process_count=2
            ),
            3,
        )[0]
        for p in range(2)
    ]
    for t in range(3):
        union = sorted(parts[0][t][:, 0, 0, 0].tolist() + parts[1][t][:, 0, 0, 0].tolist())
        assert union == sorted(single[t][:, 0, 0, 0].tolist())


def test_paper_domain_batches_are_8bit_levels_of_the_whole_slice():
    rng = np.random.default_rng(0)
    slices = rng.uniform(0.0, 1.0, (6, 16, 16)).astype(np.float32) * np.arange(1, 7)[:, None, None]
    ds = data.train_dataset(
        data.SliceSource(array=slices),
        batch_size=6,
        seed=0,
        crop_size=8,
        flip=False,
        domain=data.PAPER,
    )
    crops = ds[0]["hr"][..., 0]
    levels = crops * 255.0
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)  # 8-bit levels / 255
    whole = data.PAPER.encode(slices)[0]
    for crop in crops:  # each crop is a window of its slice's whole-slice scaling
        assert any(
            np.array_equal(crop, s[y : y + 8, x : x + 8])
            for s in whole
            for y in range(9)
            for x in range(9)
        )
