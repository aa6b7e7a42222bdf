"""MR guidance (petsr_jax.data.mr): T1 alignment errors by patient, one augmentation for PET and
T1, the residual on the PET channel only, and enhancement's refusals of a missing or unneeded T1."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from petsr_jax import data, io
from petsr_jax.config import ConfigError, build_config, validate
from petsr_jax.data import mr
from petsr_jax.models import DeepSR
from petsr_jax.volume import Volume

REPO = Path(__file__).resolve().parents[1]


def _t1_like(pet: Volume) -> Volume:
    """A T1 on the PET's grid: bright where the PET is, with a background of zeros."""
    t1 = 100.0 * pet.data / pet.data.max() + 20.0 * (pet.data > 0.2 * pet.data.max())
    return pet.replace(data=t1.astype(np.float32), units="unknown")


@pytest.fixture(scope="module")
def mr_root(nifti_root, tmp_path_factory):
    """`nifti_root` with a co-registered T1 per patient in `t1/`."""
    root = tmp_path_factory.mktemp("mr_root")
    for entry in nifti_root.iterdir():
        target = root / entry.name
        (shutil.copytree if entry.is_dir() else shutil.copy)(entry, target)
    (root / "t1").mkdir()
    for pid in data.list_patients(root):
        pet = io.read_volume(root / f"{pid}.nii.gz")
        io.write_nifti(_t1_like(pet), root / "t1" / f"{pid}.nii.gz")
    return root


@pytest.fixture(scope="module")
def mr_workdir(mr_root, tmp_path_factory):
    """A finished tiny MR-guided DeepSR run on `mr_root`."""
    from petsr_jax import train

    workdir = tmp_path_factory.mktemp("runs") / "tiny_mr"
    config = build_config("deepsr", f"tiny,mr,data.root={mr_root}")
    train.train_and_evaluate(config, workdir, progress=False)
    return workdir


def _copy_root(root: Path, target: Path) -> Path:
    shutil.copytree(root, target)
    return target


def test_config_mr_flag_feeds_the_t1_and_checks_the_channels():
    config = build_config("deepsr", "scale=8,quick,mr")
    assert config.mr.t1 and config.model.in_channels == 2
    assert mr.guidance_channels(config) == ("t1",)
    with_coordinates = build_config("deepsr", "mr,mr.coordinates=true,model.in_channels=4")
    assert mr.guidance_channels(with_coordinates) == ("t1", "radial", "axial")
    with pytest.raises(ConfigError, match="set model.in_channels=4"):
        validate(build_config("deepsr", "mr,mr.coordinates=true"), num_devices=1)


def test_a_misaligned_t1_is_refused_naming_the_patient(mr_root, tmp_path):
    root = _copy_root(mr_root, tmp_path / "root")
    t1 = io.read_volume(root / "t1" / "pat-01.nii.gz")
    shifted = t1.affine.copy()
    shifted[:3, 3] += 4.0  # two voxels off
    (root / "t1" / "pat-01.nii.gz").unlink()
    io.write_nifti(t1.replace(affine=shifted, meta={}), root / "t1" / "pat-01.nii.gz")
    with pytest.raises(data.DataError, match="patient pat-01.*not co-registered"):
        data.load_patient(root, "pat-01", root / "pat-01.nii.gz")

    (root / "t1" / "pat-01.nii.gz").unlink()
    io.write_nifti(t1.replace(data=t1.data[:, :-2], meta={}), root / "t1" / "pat-01.nii.gz")
    with pytest.raises(data.DataError, match="patient pat-01.*shape"):
        data.load_patient(root, "pat-01", root / "pat-01.nii.gz")


def test_a_missing_t1_is_an_error_naming_the_patient_before_training(mr_root, tmp_path):
    from petsr_jax import train

    root = _copy_root(mr_root, tmp_path / "root")
    (root / "t1" / "pat-02.nii.gz").unlink()
    config = build_config("deepsr", f"tiny,mr,data.root={root},data.split=2/1/1")
    with pytest.raises(data.DataError, match="patient pat-02 has no T1"):
        train.train_and_evaluate(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )


def test_t1_is_normalised_by_a_head_percentile_and_carried_per_slice(mr_root):
    slices = data.build_slice_set(mr_root, ["pat-00"], eval_split=False, guidance=("t1",))
    t1 = io.read_volume(mr_root / "t1" / "pat-00.nii.gz").data
    expected = mr.normalise_t1(t1)
    np.testing.assert_allclose(slices.guide[..., 0], expected, rtol=1e-6)
    head = expected[t1 > mr.HEAD_FRACTION * t1.max()]
    assert abs(np.percentile(head, mr.T1_PERCENTILE) - 1) < 1e-5
    assert slices.guide.shape == slices.hr.shape + (1,)


def test_crops_and_flips_are_the_same_for_pet_and_guidance():
    rng = np.random.default_rng(0)
    hr = rng.random((8, 24, 20)).astype(np.float32)
    guide = np.stack([hr * 3, hr + 1], axis=-1)  # a function of the PET pixel by pixel
    ds = data.train_dataset(
        data.SliceSource(array=hr, guide=guide), batch_size=4, seed=1, crop_size=12, flip=True
    )
    for step in range(6):
        batch = ds[step]
        assert batch["hr"].shape == (4, 12, 12, 1) and batch["guide"].shape == (4, 12, 12, 2)
        np.testing.assert_allclose(batch["guide"][..., :1], batch["hr"] * 3, rtol=1e-6)
        np.testing.assert_allclose(batch["guide"][..., 1:], batch["hr"] + 1, rtol=1e-6)


def test_coordinate_channels_move_with_the_crop():
    guide = mr.guide_slices(np.ones((3, 16, 16)), np.arange(3), 3, ("t1", "radial", "axial"))
    np.testing.assert_allclose(guide[:, 0, 0, 2], [-1, 0, 1])  # axial: first to last slice
    radial = guide[0, ..., 1]
    assert radial[8, 8] < 0.1 and radial[0, 8] > 0.9  # centre ~0, edge middle ~1
    hr = np.arange(16 * 16, dtype=np.float32).reshape(1, 16, 16)
    record = data.CropFlip(crop_size=8, flip=True).random_map(
        {"hr": hr[0], "guide": guide[:1, ..., 1:2][0]}, np.random.default_rng(3)
    )
    # Every cropped, flipped PET pixel still sits beside its own radial position.
    flat = hr[0].ravel()
    for value, r in zip(record["hr"].ravel(), record["guide"].ravel(), strict=True):
        k = int(np.flatnonzero(flat == value)[0])
        assert r == pytest.approx(radial.ravel()[k])


def test_the_global_residual_goes_to_the_pet_channel_only():
    net = DeepSR(num_blocks=1, width=4, global_skip="image")
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 2))
    params = net.init(jax.random.key(1), x)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.zeros_like(p) if "conv_out" in jax.tree_util.keystr(path) else p,
        params,
    )
    out = net.apply({"params": params}, x)
    assert out.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(out[..., 0], x[..., 0])  # the PET, not the T1
    lr_up = jnp.ones((1, 4, 4, 1))
    guide = jnp.full((1, 4, 4, 2), 5.0)
    stacked = mr.network_input(lr_up, {"guide": guide})
    assert stacked.shape == (1, 4, 4, 3) and float(stacked[0, 0, 0, 0]) == 1.0


def test_mr_guided_model_enhances_with_its_t1_and_refuses_without(mr_workdir, mr_root):
    import petsr_jax
    from petsr_jax.inference import IncompatibleInput

    sr = petsr_jax.load(mr_workdir)
    pet = io.read_volume(mr_root / "pat-03.nii.gz")
    t1 = io.read_volume(mr_root / "t1" / "pat-03.nii.gz")
    out = sr(pet, mr=t1)
    assert out.shape == pet.shape and np.all(np.isfinite(out.data))
    with pytest.raises(IncompatibleInput, match="trained with MR guidance"):
        sr(pet)
    moved = t1.affine.copy()
    moved[:3, 3] += 6.0
    with pytest.raises(IncompatibleInput, match="not co-registered"):
        sr(pet, mr=t1.replace(affine=moved))


def test_pet_only_model_refuses_a_t1(tiny_deepsr, nifti_root, mr_root):
    from petsr_jax.inference import IncompatibleInput

    pet = io.read_volume(nifti_root / "pat-03.nii.gz")
    with pytest.raises(IncompatibleInput, match="trained on PET only"):
        tiny_deepsr(pet, mr=io.read_volume(mr_root / "t1" / "pat-03.nii.gz"))


def _enhance(*args):
    # No tcmalloc re-execution (a second interpreter start): the allocator is not checked here.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PETSR_ALLOCATOR": "system"}
    cmd = [sys.executable, str(REPO / "launch" / "enhance.py"), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_enhance_refuses_a_missing_or_unneeded_t1_and_writes_nothing(
    mr_workdir, tiny_deepsr_workdir, mr_root, tmp_path
):
    pet, t1 = mr_root / "pat-03.nii.gz", mr_root / "t1" / "pat-03.nii.gz"
    missing = _enhance(f"--workdir={mr_workdir}", f"--input={pet}", f"--output={tmp_path}/a")
    assert missing.returncode != 0 and "--mr" in missing.stderr, missing.stderr[-2000:]
    unneeded = _enhance(
        f"--workdir={tiny_deepsr_workdir}", f"--input={pet}", f"--mr={t1}", f"--output={tmp_path}/b"
    )
    assert unneeded.returncode != 0 and "PET only" in unneeded.stderr, unneeded.stderr[-2000:]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    done = _enhance(
        f"--workdir={mr_workdir}", f"--input={pet}", f"--mr={t1}", f"--output={tmp_path}/c"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "c" / "pat-03.nii.gz").exists()


def _lesion_row(patient, label, gm_relation, error_pct):
    return {
        "patient": patient,
        "region": f"lesion_{label}",
        "kind": "lesion",
        "lesion_type": "cold",
        "gm_relation": gm_relation,
        "sr": {"mean_error_pct": error_pct},
    }


def _results(errors):
    rows = [_lesion_row("p", k + 1, "below" if k < 2 else "above", e) for k, e in enumerate(errors)]
    return {"results": {"regional": {"rows": rows}}}


def test_paired_lesion_differences_match_lesions_by_patient_and_label():
    """|MR error| − |PET-only error| lesion by lesion, with Student's t CI from scipy."""
    from scipy import stats

    from petsr_jax.experiments import mr_guidance

    pet_only = _results([10.0, -20.0, 5.0, -4.0])
    mr_guided = _results([30.0, -10.0, 6.0, 1.0])
    mr_guided["config"] = {"mr": {"t1": True, "dropout": 0.5}, "task": {"consistency": "block"}}
    paired = mr_guidance.paired_differences(pet_only, [mr_guided])
    by_group = {p["group"]: p for p in paired}
    differences = [20.0, -10.0, 1.0, -3.0]
    everything = by_group["all lesions"]
    assert everything["count"] == 4 and everything["mean_difference"] == pytest.approx(2.0)
    low, high = stats.t.interval(0.95, 3, 2.0, stats.sem(differences))
    assert everything["ci95"] == pytest.approx([low, high])
    below = by_group["lesions below GM uptake"]
    assert below["count"] == 2 and below["mean_difference"] == pytest.approx(5.0)
    label = "MR-guided, not anchored (T1 dropped for 50% in training, activity kept per block)"
    assert everything["label"] == label


def test_lesion_crop_windows_centre_the_lesion_and_stay_in_the_image():
    from petsr_jax.experiments import mr_guidance

    mask = np.zeros((64, 64), bool)
    mask[2:6, 58:62] = True  # near a corner
    rows, cols = mr_guidance._crop_box(mask)
    assert rows.start == 0 and cols.stop == 64 and mask[rows, cols].sum() == mask.sum()
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True  # radius √(400/π) = 11.3 px: 2.5 × that each side
    rows, cols = mr_guidance._crop_box(mask)
    assert rows == slice(30 - 29, 30 + 29) and cols == rows
