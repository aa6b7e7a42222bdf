"""Tests of the synthetic cohort (`petsr_jax.sim`): its PET simulation, patients, files on disk.

The physics checks run on a thin brain slab at 1.56 mm pixels (fine enough for grey and white
matter to have partial-volume-free cores); the whole-head, on-disk and failure checks on the
"tiny" preset. The projector is checked against scikit-image's Radon transform and the display
interpolation against PIL's bicubic resize.
"""

import dataclasses
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.data import shepp_logan_phantom
from skimage.transform import radon, resize

from petsr_jax import io, sim
from petsr_jax.sim import acquisition, cohort, scanner

TINY = sim.PRESETS["tiny"]
# Twelve 2.78 mm slices from the cerebellum to the basal ganglia, at 1.56 mm pixels.
SLAB = sim.CohortSpec(
    n_patients=4,
    n_slices=12,
    size=192,
    recon_size=192,
    n_angles=168,
    n_subsets=28,
    z_range_mm=(-30.0, 3.36),
)


@functools.cache
def patient(spec, index, seed=0):
    return sim.generate_patient(spec, index, seed)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohorts") / "tiny"
    return sim.ensure_cohort("tiny", root=root, seed=0, progress=False, workers=1)


def tissue_core(labels, code, spacing, depth_mm):
    """Voxels of one tissue at least `depth_mm` from any other tissue (free of partial volume
    at the scanner's resolution)."""
    return ndi.distance_transform_edt(labels == code, sampling=spacing) > depth_mm


# ------------------------------------------------------------------------------------------
# Projector and reconstruction
# ------------------------------------------------------------------------------------------


def test_projector_matches_skimage_radon():
    # Odd size: scikit-image rotates about pixel (n // 2, n // 2), the exact image centre.
    size = 65
    image = resize(shepp_logan_phantom(), (size, size), anti_aliasing=True).astype(np.float32)
    yy, xx = np.mgrid[:size, :size] - size // 2
    image = ndi.gaussian_filter(image, 1.0) * (yy**2 + xx**2 < (size // 2 - 1) ** 2)
    geometry = scanner.ScannerGeometry(size=size, pixel_mm=1.0, n_angles=60)
    ours = scanner.project(geometry, image[None])[0].T  # [bins, angles], as radon
    reference = radon(image, theta=np.degrees(geometry.angles), circle=True)
    # Joseph's linear interpolation vs. scikit-image's rotate-and-sum: equal up to interpolation.
    assert np.linalg.norm(ours - reference) / np.linalg.norm(reference) < 0.01
    # The path-length weights make a ray through a uniform disc as long as its chord.
    disc = scanner.fov_mask(size).astype(np.float32)
    central = scanner.project(geometry, disc[None])[0][:, size // 2]
    np.testing.assert_allclose(central, size, rtol=0.03)


def test_osem_recovers_activity_quantitatively():
    size, pixel_mm = 64, 4.0
    geometry = scanner.ScannerGeometry(size=size, pixel_mm=pixel_mm, n_angles=48)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = (yy**2 + xx**2 <= 24**2).astype(np.float32)
    activity = np.stack([disc * 5.0, disc * 12.0])  # two slices, two levels
    matrix = scanner.system_matrix(geometry)
    attenuation = np.exp(-(matrix @ scanner.to_columns(disc[None] * 0.0096))).repeat(2, axis=1)
    multiplicative = (100.0 * attenuation).astype(np.float32)
    additive = np.full_like(multiplicative, 3.0)
    counts = multiplicative * (matrix @ scanner.to_columns(activity)) + additive
    recon = scanner.osem(
        geometry, counts, multiplicative, additive, n_iterations=6, n_subsets=8, psf_fwhm_mm=0
    )
    interior = (yy**2 + xx**2) <= 18**2
    np.testing.assert_allclose([recon[0][interior].mean(), recon[1][interior].mean()], [5, 12],
                               rtol=0.03)  # fmt: skip
    assert recon[:, ~scanner.fov_mask(size)].max() == 0


def test_display_interpolation_matches_pil_bicubic():
    rng = np.random.default_rng(0)
    images = ndi.gaussian_filter(rng.random((2, 48, 48)), (0, 2, 2)).astype(np.float32)
    resample = acquisition.resample_matrix(48, 96)
    ours = resample @ images[0] @ resample.T
    reference = np.asarray(Image.fromarray(images[0]).resize((96, 96), Image.BICUBIC))
    # PIL and the matrix differ only in how they extend the image past its border.
    np.testing.assert_allclose(ours[4:-4, 4:-4], reference[4:-4, 4:-4], atol=1e-5)


# ------------------------------------------------------------------------------------------
# One patient
# ------------------------------------------------------------------------------------------


def test_same_seed_same_patient_and_patients_differ():
    first, again = patient(TINY, 1), sim.generate_patient(TINY, 1, 0)
    for key in ("pet", "activity", "t1", "mask", "labels", "lesions"):
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)
    assert first["facts"] == again["facts"]
    other = patient(TINY, 2)
    assert not np.allclose(first["pet"], other["pet"])
    assert first["facts"]["rotation_deg"] != other["facts"]["rotation_deg"]
    reseeded = patient(TINY, 1, seed=1)
    assert not np.allclose(first["activity"], reseeded["activity"])


def test_shapes_types_and_geometry():
    result = patient(TINY, 0)
    shape = (TINY.n_slices, TINY.size, TINY.size)
    for key, dtype in (("pet", np.float32), ("t1", np.float32), ("mask", np.uint8),
                       ("labels", np.uint8), ("lesions", np.uint8)):  # fmt: skip
        assert result[key].shape == shape and result[key].dtype == dtype, key
    assert set(np.unique(result["labels"])) <= set(sim.LABELS)
    assert result["pet"].min() >= 0
    affine = result["geometry"]["affine"]
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), TINY.spacing[::-1])
    grey_bqml = result["facts"]["uptake_scale_bqml"]
    assert 8000 <= grey_bqml <= 15000


def test_grey_to_white_ratio_in_reconstructed_pet():
    result = patient(SLAB, 0)
    grey = tissue_core(result["labels"], 1, SLAB.spacing, 5.0)
    white = tissue_core(result["labels"], 2, SLAB.spacing, 5.0)
    assert grey.sum() > 500 and white.sum() > 200
    nominal = result["facts"]["grey_to_white_ratio"]
    truth = result["activity"][grey].mean() / result["activity"][white].mean()
    assert truth == pytest.approx(nominal, rel=0.1)
    # The scanner's 4.5 mm resolution pulls the cores towards each other a little.
    measured = result["pet"][grey].mean() / result["pet"][white].mean()
    assert 3.0 <= measured <= 5.0
    assert measured < truth


def test_noise_present_and_falls_with_count_level():
    low = dataclasses.replace(SLAB, counts_per_slice=(3e5, 3e5))
    high = dataclasses.replace(SLAB, counts_per_slice=(4.8e6, 4.8e6))
    noisy, clean = patient(low, 1), patient(high, 1)
    # The count level has its own random stream: the anatomy is the same.
    np.testing.assert_array_equal(noisy["activity"], clean["activity"])
    assert noisy["facts"]["counts_per_slice"] < clean["facts"]["counts_per_slice"]
    white = tissue_core(clean["labels"], 2, SLAB.spacing, 4.0)
    assert white.sum() > 200

    def residual_spread(pet):
        """Relative std of what is left after removing the local mean, in the white matter."""
        residual = pet - ndi.gaussian_filter(pet, (0, 2, 2))
        return residual[white].std() / pet[white].mean()

    spread_low, spread_high = residual_spread(noisy["pet"]), residual_spread(clean["pet"])
    assert spread_high > 0.02
    # Poisson data, 16× the counts: the noise falls (by ~3×; OSEM is not linear in the data).
    assert spread_low > 2.0 * spread_high


def _shift_correlation(a, b, reach=3):
    """Correlation of `a` with `b` shifted in-plane by every (dy, dx) within `reach`."""
    scores = {}
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            shifted = np.roll(b, (dy, dx), axis=(1, 2))
            scores[dy, dx] = np.corrcoef(a.ravel(), shifted.ravel())[0, 1]
    return scores


def test_mask_and_t1_are_registered_to_pet():
    result = patient(SLAB, 0)
    pet, t1, mask = result["pet"], result["t1"], result["mask"].astype(bool)
    head = result["labels"] > 0
    assert pet[mask].mean() > 3 * pet[head & ~mask].mean()
    scores = _shift_correlation(pet, mask.astype(np.float32))
    assert max(scores, key=scores.get) == (0, 0)
    # Edges of the T1 (head outline, brain surface, ventricles) lie on the PET's edges.
    edges_pet = np.hypot(*np.gradient(ndi.gaussian_filter(pet, (0, 1, 1)), axis=(1, 2)))
    edges_t1 = np.hypot(*np.gradient(ndi.gaussian_filter(t1, (0, 1, 1)), axis=(1, 2)))
    scores = _shift_correlation(edges_pet, edges_t1)
    assert max(scores, key=scores.get) == (0, 0)
    assert scores[0, 0] > 0.3


def test_lower_slices_hold_head_tissue_not_brain():
    result = patient(TINY, 0)
    labels, mask, pet = result["labels"], result["mask"], result["pet"]
    lowest = slice(0, 2)  # jaw and teeth level (MNI z ≈ -136 and -115 mm)
    assert mask[lowest].sum() == 0
    assert (labels[lowest] == 4).sum() > 200  # soft tissue
    assert (labels[lowest] == 5).sum() > 20  # mandible and teeth
    tissue = labels[lowest] > 0
    assert pet[lowest][tissue].mean() > 0.05 * pet[mask.astype(bool)].mean()
    assert mask.reshape(TINY.n_slices, -1).sum(1).max() > 500  # brain slices exist above


def test_lesions_are_hot_or_cold_against_their_surroundings():
    kinds = set()
    for index in (0, 3):
        result = patient(SLAB, index)
        x, y, z = sim.grid_axes(SLAB, SLAB.size)
        for lesion in result["facts"]["lesions"]:
            inside = result["lesions"] == lesion["label"]
            cx, cy, cz = lesion["centre_mm"]
            distance = np.sqrt((z[:, None, None] - cz) ** 2 + (y[None, :, None] - cy) ** 2
                               + (x[None, None, :] - cx) ** 2)  # fmt: skip
            radius = lesion["radius_mm"]
            shell = (distance > radius + SLAB.pixel_mm) & (distance <= 2 * radius)
            if inside.sum() < 5 or shell.sum() < 20:
                continue
            truth = result["activity"][inside].mean() / result["activity"][shell].mean()
            assert truth == pytest.approx(lesion["contrast"], rel=0.25)
            if radius < 5.0:
                continue  # smaller than the scanner resolution: contrast mostly lost
            measured = result["pet"][inside].mean() / result["pet"][shell].mean()
            if lesion["kind"] == "hot":
                assert measured > 1.15, lesion
            else:
                assert measured < 0.85, lesion
            kinds.add(lesion["kind"])
    assert kinds == {"hot", "cold"}


# ------------------------------------------------------------------------------------------
# On disk
# ------------------------------------------------------------------------------------------


def test_disk_round_trip_equals_generated_data(tiny_root):
    description = json.loads((tiny_root / "cohort.json").read_text())
    assert description["generator"] == sim.GENERATOR and description["seed"] == 0
    assert [p["patient_id"] for p in description["patients"]] == [
        sim.patient_id(i) for i in range(TINY.n_patients)
    ]
    generated = patient(TINY, 0)
    assert description["patients"][0]["lesions"] == json.loads(
        json.dumps(generated["facts"]["lesions"])
    )
    volume = io.read_volume(tiny_root / "sub-001")
    assert volume.units == "BQML" and volume.patient_id == "sub-001"
    np.testing.assert_allclose(volume.spacing, TINY.spacing, rtol=1e-5)
    np.testing.assert_allclose(volume.affine, generated["geometry"]["affine"], atol=1e-3)
    # 16-bit storage with one slope per slice: each slice within half its own step.
    step = generated["pet"].reshape(TINY.n_slices, -1).max(1) / 32767
    error = np.abs(volume.data - generated["pet"]).reshape(TINY.n_slices, -1).max(1)
    assert np.all(error <= step / 2 + 1e-3)
    for folder, key in (("masks", "mask"), ("labels", "labels"), ("lesions", "lesions")):
        array, affine = io.read_nifti_array(tiny_root / folder / "sub-001.nii.gz")
        assert array.dtype == np.uint8, folder
        np.testing.assert_array_equal(array, generated[key], err_msg=folder)
    t1, affine = io.read_nifti_array(tiny_root / "t1" / "sub-001.nii.gz")
    np.testing.assert_allclose(t1, generated["t1"], rtol=1e-6)
    # The NIfTI maps share the PET grid: same affine once LPS is turned into RAS.
    np.testing.assert_allclose(np.diag([-1, -1, 1, 1]) @ volume.affine, affine, atol=1e-3)


def test_dicom_series_is_16_bit_with_per_slice_slopes(tiny_root):
    files = sorted((tiny_root / "sub-002").glob("*.dcm"))
    assert len(files) == TINY.n_slices
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert {h.Modality for h in headers} == {"PT"}
    assert {h.Units for h in headers} == {"BQML"}
    assert {h.BitsAllocated for h in headers} == {16}
    assert len({float(h.RescaleSlope) for h in headers}) > TINY.n_slices // 2
    assert {h.PatientID for h in headers} == {"sub-002"}
    assert len({h.SeriesInstanceUID for h in headers}) == 1


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
def test_dicom_series_passes_the_pet_iod_validator(tiny_root):
    first = sorted((tiny_root / "sub-001").glob("*.dcm"))[0]
    checked = subprocess.run(["dciodvfy", "-new", str(first)], capture_output=True, text=True)
    report = checked.stdout + checked.stderr
    assert "PETImage" in report
    assert [line for line in report.splitlines() if line.startswith("Error")] == []


def _must_not_generate(*args, **kwargs):
    raise AssertionError("a finished cohort was generated again")


def test_finished_root_is_reused_and_checked(tiny_root, monkeypatch):
    monkeypatch.setattr(cohort, "generate_cohort", _must_not_generate)
    assert sim.ensure_cohort("tiny", root=tiny_root, progress=False) == tiny_root
    with pytest.raises(ValueError, match="seed"):
        sim.ensure_cohort("tiny", root=tiny_root, seed=7, progress=False)
    with pytest.raises(ValueError, match="unknown cohort preset"):
        sim.ensure_cohort("huge", root=tiny_root)


def test_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no cohort.json"):
        sim.generate_cohort(TINY, tmp_path, progress=False, workers=1)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_interrupted_generation_leaves_nothing_finished(tmp_path, monkeypatch):
    spec = dataclasses.replace(TINY, n_patients=2)
    written = []
    real_write = cohort.write_patient

    def write_then_fail(*args, **kwargs):
        if written:
            raise KeyboardInterrupt  # the user stops the run after the first patient
        written.append(real_write(*args, **kwargs))

    monkeypatch.setattr(cohort, "write_patient", write_then_fail)
    root = tmp_path / "cohort"
    with pytest.raises(KeyboardInterrupt):
        sim.generate_cohort(spec, root, progress=False, workers=1)
    assert written  # one patient was on disk before the interruption
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []  # the partial folder is gone too


def test_default_root_follows_environment_and_version(monkeypatch, tmp_path):
    monkeypatch.setenv(sim.DEFAULT_ROOT_ENV, str(tmp_path))
    assert sim.default_root("small", 3) == tmp_path / f"cohort-small-seed3-v{sim.VERSION}"
    monkeypatch.setattr(cohort, "VERSION", "7")
    assert sim.default_root("small", 3).name == "cohort-small-seed3-v7"
    monkeypatch.delenv(sim.DEFAULT_ROOT_ENV)
    assert sim.default_root("paper", 0).parent == Path.home() / ".cache" / "petsr_jax"


def _described_as(root, **fields):
    description = json.loads((root / "cohort.json").read_text())
    return {key: description[key] for key in fields} == fields


def test_cohort_of_another_version_is_left_beside_a_new_one(tiny_root, monkeypatch, tmp_path):
    monkeypatch.setenv(sim.DEFAULT_ROOT_ENV, str(tmp_path))
    # The caches this version wrote, and one from before folder names held the version.
    current, cached = cohort.VERSION, sim.default_root("tiny", 0)
    shutil.copytree(tiny_root, cached)
    unversioned = tmp_path / "cohort-tiny-seed0"
    shutil.copytree(tiny_root, unversioned)
    # The generator moves on: a new version (here with a one-patient tiny preset, to be quick).
    newer = str(int(current) + 1)
    monkeypatch.setattr(cohort, "VERSION", newer)
    monkeypatch.setitem(sim.PRESETS, "tiny", dataclasses.replace(TINY, n_patients=1))

    root = sim.ensure_cohort("tiny", seed=0, progress=False, workers=1)

    assert root == tmp_path / f"cohort-tiny-seed0-v{newer}"
    assert _described_as(root, version=newer, n_patients=1)
    for old in (cached, unversioned):
        assert _described_as(old, version=current, n_patients=TINY.n_patients)
    monkeypatch.setattr(cohort, "generate_cohort", _must_not_generate)
    assert sim.ensure_cohort("tiny", seed=0, progress=False) == root


def test_damaged_cohort_names_the_folder_to_delete(tiny_root, tmp_path):
    root = tmp_path / "cohort"
    shutil.copytree(tiny_root, root)
    deleting = re.escape(f"delete {root} to regenerate it")
    (root / "labels" / "sub-003.nii.gz").unlink()
    with pytest.raises(ValueError, match=f"damaged cohort.*sub-003.nii.gz.*{deleting}"):
        sim.ensure_cohort("tiny", root=root, progress=False)
    shutil.copy(tiny_root / "labels" / "sub-003.nii.gz", root / "labels")
    sim.ensure_cohort("tiny", root=root, progress=False)
    min(root.glob("sub-002/*.dcm")).unlink()  # a series short of a slice
    with pytest.raises(ValueError, match=f"damaged cohort.*sub-002.*{deleting}"):
        sim.ensure_cohort("tiny", root=root, progress=False)
    (root / "cohort.json").write_text('{"generator": ')
    with pytest.raises(ValueError, match=f"unreadable cohort description.*{deleting}"):
        sim.ensure_cohort("tiny", root=root, progress=False)
    (root / "cohort.json").write_text('{"version": "2"}')
    with pytest.raises(ValueError, match=f"not a cohort description.*{deleting}"):
        sim.ensure_cohort("tiny", root=root, progress=False)


def test_montage_is_written(tiny_root, tmp_path):
    path = sim.save_montage(tiny_root, tmp_path / "montage.png", n_patients=2)
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 300
    assert [p.name for p in tmp_path.iterdir()] == ["montage.png"]


# ------------------------------------------------------------------------------------------
# The bicubic difficulty measurement (launch/cohort_difficulty.py)
# ------------------------------------------------------------------------------------------


@functools.cache
def difficulty():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "launch" / "cohort_difficulty.py"
    spec = importlib.util.spec_from_file_location("cohort_difficulty", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_difficulty_psnr_is_the_hand_computed_one():
    rng = np.random.default_rng(0)
    image = ndi.gaussian_filter(rng.random((96, 96)), 3) * 700.0 + 50.0
    hr8 = difficulty().to_uint8(image)
    assert hr8.dtype == np.uint8 and hr8.min() == 0 and hr8.max() == 255
    np.testing.assert_array_equal(
        hr8, np.round((image - image.min()) / (image.max() - image.min()) * 255)
    )
    low = Image.fromarray(hr8).resize((12, 12), Image.BICUBIC)
    up = np.asarray(low.resize((96, 96), Image.BICUBIC), np.float64)
    mse = np.mean((hr8 / 255.0 - up / 255.0) ** 2)
    psnr, ssim = difficulty().bicubic_scores(hr8, 8)
    assert psnr == pytest.approx(10 * np.log10(1.0 / mse), abs=1e-9)
    assert 0.0 < ssim < 1.0
    psnr16, ssim16 = difficulty().bicubic_scores(hr8, 16)
    assert psnr16 < psnr and ssim16 < ssim
    assert difficulty().to_uint8(np.ones((8, 8))) is None  # a constant slice is skipped


def test_difficulty_takes_the_largest_brain_slices():
    mask = np.zeros((60, 8, 8), bool)
    areas = np.random.default_rng(1).permutation(60)
    for k, area in enumerate(areas):
        mask[k].flat[:area] = True
    chosen = difficulty().brain_slices(np.zeros(mask.shape), mask)
    np.testing.assert_array_equal(chosen, np.sort(np.argsort(-areas)[:49]))
    np.testing.assert_array_equal(difficulty().brain_slices(np.zeros((12, 8, 8)), None), range(12))


def test_difficulty_of_a_root_reads_the_stored_cohort(tiny_root):
    scores, n = difficulty().measure_root(tiny_root, scales=(4, 8), log=lambda _: None)
    assert n == TINY.n_patients
    direct = [difficulty().volume_scores(patient(TINY, i)["pet"], patient(TINY, i)["mask"], (4, 8))
              for i in range(TINY.n_patients)]  # fmt: skip
    for s in (4, 8):
        expected = np.concatenate([d[s] for d in direct])
        assert scores[s].shape == expected.shape
        # The stored series is 16-bit: the same slices, to within its quantisation.
        np.testing.assert_allclose(scores[s].mean(0), expected.mean(0), atol=0.05)
    assert "| 8× |" in difficulty().table(scores)
