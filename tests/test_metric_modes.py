"""Metric modes and regional recovery: the paper's 8-bit protocol against PIL + scikit-image,
and lesion / grey-matter activity errors against hand computations."""

import shutil

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from petsr_jax import data, io, sharding
from petsr_jax.data.degrade import degrade
from petsr_jax.evaluation import evaluate, regional
from petsr_jax.models import DeepSR
from petsr_jax.task import Bicubic, Task


@pytest.fixture(scope="module")
def net():
    """A small untrained DeepSR: the modes are about the pipeline around any network."""
    model = DeepSR(num_blocks=1, width=8)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    return model, params


def _smooth_image(shape, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    cy, cx = rng.uniform(0.3, 0.7, 2) * shape
    image = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (3.0 * shape[0]))
    return (5e3 * image + 500.0 * rng.random(shape)).astype(np.float32)


def _pil_degrade(image8: np.ndarray, scale: int) -> np.ndarray:
    """The authors' degradation: PIL bicubic down, then up, on an 8-bit ('L') image."""
    h, w = image8.shape
    pil = Image.fromarray(image8)
    assert pil.mode == "L"
    low = pil.resize((max(1, w // scale), max(1, h // scale)), Image.BICUBIC)
    return np.asarray(low.resize((w, h), Image.BICUBIC))


def _minmax_uint8(image: np.ndarray) -> np.ndarray:
    scaled = (image - image.min()) / (image.max() - image.min()) * 255.0
    return np.floor(scaled + 0.5).astype(np.uint8)


def _authors_uint8(image: np.ndarray) -> np.ndarray:
    """The authors' preprocessing, `(x − min) · 256 / (max − min)` as uint8, without the
    overflow of the brightest pixel (256 → 0 in their code, 255 here)."""
    scaled = (image - image.min()) * (256.0 / (image.max() - image.min()))
    return np.minimum(scaled, 255).astype(np.uint8)


@pytest.mark.parametrize("shape, scale", [((64, 64), 8), ((100, 90), 12), ((37, 53), 4)])
def test_paper_domain_degrade_matches_pil_on_l_images(shape, scale):
    image = _smooth_image(shape, seed=scale)
    hr8 = _minmax_uint8(image)
    batch = jnp.asarray(hr8 / 255.0, jnp.float32)[None, ..., None]
    paper = jax.jit(degrade, static_argnums=(1, 2))(batch, scale, data.PAPER)
    got = np.round(np.asarray(paper)[0, ..., 0] * 255.0)
    expected = _pil_degrade(hr8, scale)
    diff = np.abs(got - expected.astype(np.float32))
    # PIL's fixed-point coefficients may move a value sitting on a half by one level.
    assert diff.max() <= 1 and np.mean(diff == 0) >= 0.999
    # Rounding only once, after a float degrade, is not what PIL does (≈ 1/4 of pixels differ).
    once = np.floor(np.asarray(degrade(batch * 255.0, scale))[0, ..., 0] + 0.5)
    assert np.mean(once != expected) > 0.05


def test_paper_domain_is_the_authors_per_slice_8bit_scaling():
    stack = np.stack([_smooth_image((24, 24), s) for s in range(3)])
    stack[1] *= 40.0  # a brighter slice: per-slice scaling removes it
    stack[2] = 7.0  # a constant slice
    encoded, low, span = data.PAPER.encode(stack)
    for i in range(2):
        np.testing.assert_array_equal(encoded[i] * 255.0, _authors_uint8(stack[i]))
    np.testing.assert_array_equal(encoded[2], 0)
    # Mapped back within one 8-bit level of each slice's own range.
    back = data.PAPER.decode(encoded, low, span)
    for i in range(3):
        assert np.abs(back[i] - stack[i]).max() <= max(float(np.ptp(stack[i])), 1e-6) / 255
    physical, low, span = data.PHYSICAL.encode(stack)
    np.testing.assert_array_equal(physical, stack)
    np.testing.assert_array_equal(data.PHYSICAL.decode(physical, low, span), stack)


def test_paper_domain_scores_match_pil_and_scikit_image(net, nifti_root):
    model, params = net
    slices = data.build_slice_set(nifti_root, ["pat-00", "pat-01"], eval_split=True)
    mesh = sharding.make_mesh()
    scores = evaluate.evaluate(
        params, slices, model=model, task=Task(Bicubic(8, data.PAPER)), mesh=mesh, batch_size=3
    )
    for i in range(len(slices)):
        hr8 = _authors_uint8(np.asarray(slices.hr[i]))
        lr8 = _pil_degrade(hr8, 8)
        out = model.apply(
            {"params": params}, jnp.asarray(lr8 / 255.0, jnp.float32)[None, ..., None]
        )
        # The authors stored outputs as uint8 PNGs: ×255, clipped, truncated.
        sr8 = np.clip(np.asarray(out)[0, ..., 0] * 255.0, 0, 255).astype(np.uint8)
        target = hr8 / 255.0
        for name, image in (("bicubic", lr8 / 255.0), ("sr", sr8 / 255.0)):
            np.testing.assert_allclose(
                scores[f"{name}/psnr"][i],
                peak_signal_noise_ratio(target, image, data_range=1),
                rtol=2e-3,  # one grey level of PIL rounding on a pixel or two
            )
            np.testing.assert_allclose(
                scores[f"{name}/ssim"][i],
                structural_similarity(target, image, data_range=1),
                atol=2e-3,
            )
    # The same outputs, mapped back per slice, are scored per volume and in the brain too.
    assert {"sr/psnr_physical", "sr/ssim_physical", "sr/psnr_brain"} <= set(scores)
    physical = evaluate.evaluate(params, slices, model=model, task=Task(Bicubic(8)), mesh=mesh)
    assert not np.allclose(scores["bicubic/psnr"], physical["bicubic/psnr"])
    # Bicubic in per-volume units after the 8-bit round trip: close to, not equal to, physical.
    np.testing.assert_allclose(scores["bicubic/psnr_physical"], physical["bicubic/psnr"], atol=1.5)


# ------------------------------------------------------------------------- regional recovery


def test_region_rows_with_a_perfect_model_and_a_known_blur():
    truth = np.full((2, 6, 6), 100.0, np.float32)
    truth[0, 1:3, 1:3] = 400.0  # lesion 1: a hot 2x2 square on slice 0
    truth[1, 4, 4] = 50.0  # lesion 3: one cold voxel (lesion 2 absent: skipped)
    labels = np.zeros(truth.shape, np.uint8)
    labels[:, 3:, :3] = 1  # grey matter
    labels[:, :, 5] = 2  # white matter: not reported
    lesions = np.zeros(truth.shape, np.uint8)
    lesions[0, 1:3, 1:3] = 1
    lesions[1, 4, 4] = 3
    blurred = truth.copy()
    blurred[0, 1:3, 1:3] = [[300.0, 340.0], [320.0, 360.0]]
    blurred[1, 4, 4] = 80.0
    rows = regional.region_rows(
        truth,
        {"bicubic": blurred, "sr": truth},
        labels=labels,
        lesions=lesions,
        patient="p",
        units="BQML",
    )
    by_region = {row["region"]: row for row in rows}
    assert list(by_region) == ["grey_matter", "lesion_1", "lesion_3"]
    for row in rows:
        for key in ("mean_error", "mean_error_pct", "max_error", "max_error_pct"):
            assert row["sr"][key] == 0.0
    lesion = by_region["lesion_1"]
    assert lesion["voxels"] == 4 and lesion["true_mean"] == 400.0 and lesion["true_max"] == 400.0
    assert lesion["bicubic"]["mean"] == pytest.approx(330.0)
    assert lesion["bicubic"]["mean_error_pct"] == pytest.approx(-17.5)
    assert lesion["bicubic"]["max_error"] == pytest.approx(-40.0)
    cold = by_region["lesion_3"]
    assert cold["bicubic"]["mean_error_pct"] == pytest.approx(60.0)
    assert by_region["grey_matter"]["bicubic"]["mean_error"] == 0.0
    summary = regional.summarise_regions(rows)
    assert summary["lesion"]["count"] == 2 and summary["grey_matter"]["count"] == 1
    assert summary["lesion"]["bicubic"]["mean_error_pct"] == pytest.approx((-17.5 + 60.0) / 2)
    assert summary["lesion"]["bicubic"]["abs_mean_error_pct"] == pytest.approx((17.5 + 60.0) / 2)
    assert summary["lesion"]["sr"]["abs_max_error_pct"] == 0.0


def _write_map(path, array, like):
    """An integer map on the PET grid, with `io.read_nifti_array`'s axis mapping."""
    image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), nib.load(like).affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def test_regional_recovery_against_a_hand_computation(net, nifti_root, tmp_path):
    model, params = net
    root = shutil.copytree(nifti_root, tmp_path / "root")
    pet, _ = io.read_nifti_array(root / "pat-01.nii.gz")
    labels = np.zeros(pet.shape, np.uint8)
    labels[2:6, 8:24, 8:24] = 1
    lesions = np.zeros(pet.shape, np.uint8)
    lesions[3, 12:15, 12:15] = 1
    lesions[5, 18:20, 10:12] = 2
    _write_map(root / "labels" / "pat-01.nii.gz", labels, root / "pat-01.nii.gz")
    _write_map(root / "lesions" / "pat-01.nii.gz", lesions, root / "pat-01.nii.gz")
    mesh = sharding.make_mesh()
    result = regional.regional_recovery(
        params,
        root,
        ["pat-01", "pat-02"],
        model=model,
        task=Task(Bicubic(8)),
        mesh=mesh,
        batch_size=3,
    )
    assert result["skipped"] == ["pat-02"] and result["units"] == "BQML"
    assert [r["region"] for r in result["rows"]] == ["grey_matter", "lesion_1", "lesion_2"]

    peak = pet.max()
    lr_up = degrade(jnp.asarray(pet / peak, jnp.float32)[..., None], 8)
    sr = np.asarray(model.apply({"params": params}, lr_up))[..., 0] * peak
    lr_up = np.asarray(lr_up)[..., 0] * peak
    for row, region in zip(result["rows"], [labels == 1, lesions == 1, lesions == 2], strict=True):
        assert row["voxels"] == region.sum()
        assert row["true_mean"] == pytest.approx(pet[region].mean(), rel=1e-6)
        for name, image in (("bicubic", lr_up), ("sr", sr)):
            true_max = pet[region].max()
            assert row[name]["mean_error"] == pytest.approx(
                image[region].mean() - pet[region].mean(), rel=1e-4, abs=1e-3
            )
            assert row[name]["max_error_pct"] == pytest.approx(
                100 * (image[region].max() - true_max) / true_max, rel=1e-4, abs=1e-4
            )
    assert result["summary"]["lesion"]["count"] == 2


# ------------------------------------------------------------------ lesion contrast recovery


def test_lesion_shell_is_the_surroundings_within_one_equivalent_radius():
    """A cube lesion of 27 voxels of 2 mm: equivalent radius (3·216/4π)^⅓ = 3.72 mm, so the
    shell holds the voxels within 3.72 mm of it (a face neighbour at 2 mm, an edge neighbour at
    2.83 mm, a corner at 3.46 mm, none at 4 mm), outside any lesion and inside the brain."""
    lesions = np.zeros((9, 9, 9), np.uint8)
    lesions[3:6, 3:6, 3:6] = 1
    lesions[7, 4, 4] = 2  # a second lesion inside the first's reach: never its surroundings
    brain = np.ones(lesions.shape, bool)
    brain[:, :, 8] = False
    shells = regional.lesion_shells(lesions, (2.0, 2.0, 2.0), brain)
    distance = np.full(lesions.shape, np.inf)  # brute force: nearest lesion-1 voxel centre
    for z, y, x in np.argwhere(lesions == 1):
        grid = np.indices(lesions.shape)
        d = 2.0 * np.sqrt((grid[0] - z) ** 2 + (grid[1] - y) ** 2 + (grid[2] - x) ** 2)
        distance = np.minimum(distance, d)
    radius = (3 * 27 * 8 / (4 * np.pi)) ** (1 / 3)
    expected = (distance > 0) & (distance <= radius) & (lesions == 0) & brain
    np.testing.assert_array_equal(shells[1], expected)
    assert not shells[1][7, 4, 4] and shells[1][6, 4, 4] and not shells[1][8, 4, 4]
    assert set(shells) == {1, 2}


def test_contrast_recovery_of_hot_and_cold_lesions_by_hand():
    """Lesion 400 in a shell of 100 (contrast 4) and lesion 40 in 200 (contrast 0.2), on a
    grey matter of 250: one hot above GM, one cold below it; an image that halves the hot
    lesion's excess recovers half its contrast, one that fills the cold lesion to its shell
    recovers none."""
    truth = np.full((1, 12, 12), 100.0, np.float32)
    truth[0, :, 6:] = 200.0
    truth[0, 2:4, 2:4] = 400.0  # hot lesion 1 in the 100 half
    truth[0, 8:10, 8:10] = 40.0  # cold lesion 2 in the 200 half
    labels = np.zeros(truth.shape, np.uint8)
    labels[0, 11, :] = 1  # grey matter
    truth[0, 11, :] = 250.0
    lesions = np.zeros(truth.shape, np.uint8)
    lesions[0, 2:4, 2:4] = 1
    lesions[0, 8:10, 8:10] = 2
    shells = {1: np.zeros(truth.shape, bool), 2: np.zeros(truth.shape, bool)}
    shells[1][0, 0:6, 0:6] = True
    shells[1][0, 2:4, 2:4] = False
    shells[2][0, 6:11, 6:12] = True
    shells[2][0, 8:10, 8:10] = False
    image = truth.copy()
    image[0, 2:4, 2:4] = 250.0  # hot: contrast 2.5, (2.5 − 1) / (4 − 1) = 0.5
    image[0, 8:10, 8:10] = 200.0  # cold: filled to its shell, CRC 0
    rows = regional.region_rows(
        truth, {"bicubic": image, "sr": truth}, labels=labels, lesions=lesions, shells=shells
    )
    hot, cold = (r for r in rows if r["kind"] == "lesion")
    assert hot["true_contrast"] == pytest.approx(4.0) and hot["lesion_type"] == "hot"
    assert cold["true_contrast"] == pytest.approx(0.2) and cold["lesion_type"] == "cold"
    assert hot["gm_relation"] == "above" and cold["gm_relation"] == "below"
    assert hot["bicubic"]["crc"] == pytest.approx(0.5) and cold["bicubic"]["crc"] == 0.0
    assert hot["sr"]["crc"] == pytest.approx(1.0) and cold["sr"]["crc"] == pytest.approx(1.0)
    # The cold form, (1 − L/B) / (1 − L_true/B_true), is the same number.
    assert regional.contrast_recovery(0.6, 0.2) == pytest.approx((1 - 0.6) / (1 - 0.2))
    summary = regional.summarise_regions(rows)
    assert summary["lesion"]["count"] == 2
    assert summary["lesion_hot"]["count"] == summary["lesion_below_gm"]["count"] == 1
    assert summary["lesion"]["bicubic"]["crc"] == pytest.approx(0.25)
    assert summary["lesion_cold"]["bicubic"]["mean_error_pct"] == pytest.approx(400.0)
    assert "crc" not in summary["grey_matter"]["bicubic"]


def test_confidence_interval_against_scipy():
    from scipy import stats

    values = [12.0, 3.5, 7.25, 20.0, 1.0, 9.0]
    mean, ci = regional.mean_and_ci(values + [None])
    low, high = stats.t.interval(0.95, len(values) - 1, np.mean(values), stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert ci == pytest.approx([low, high])
    assert regional.mean_and_ci([5.0]) == (5.0, None) and regional.mean_and_ci([]) == (None, None)


def test_no_crc_for_a_lesion_the_reference_shows_without_contrast():
    assert regional.contrast_recovery(1.5, 1.0 + regional.MIN_CONTRAST / 2) is None
    assert regional.contrast_recovery(1.5, 2.0) == pytest.approx(0.5)
    assert regional.contrast_recovery(None, 2.0) is None
