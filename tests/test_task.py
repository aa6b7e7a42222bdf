"""The task object: degradations against scipy, activity kept, 2.5D context, one end-to-end run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from petsr_jax import data
from petsr_jax.config import ConfigError, build_config, validate
from petsr_jax.data.degrade import degrade
from petsr_jax.task import (
    Bicubic,
    Scanner,
    Task,
    blur,
    conserve_activity,
    conserve_activity_unblocked,
    sigma_of,
)


def _scanner(**changes):
    fields = dict(
        fwhm_min_mm=4.0,
        fwhm_max_mm=4.0,
        target_ratio=0.5,
        noise_min=0.0,
        noise_max=0.0,
        noise_fwhm_px=1.5,
        pixel_mm=2.0,
        slice_mm=2.5,
    )
    return Scanner(**{**fields, **changes})


def test_blur_equals_scipy_gaussian_filter_in_3d():
    rng = np.random.default_rng(0)
    stack = rng.random((2, 20, 24, 9)).astype(np.float32)
    sigma_xy, sigma_z = np.array([1.3, 0.7]), np.array([0.9, 1.6])
    out = np.asarray(blur(jnp.asarray(stack), sigma_xy, sigma_z, out_slices=3))
    for n in range(2):
        want = ndi.gaussian_filter(
            stack[n], (sigma_xy[n], sigma_xy[n], sigma_z[n]), mode="constant", truncate=12
        )
        np.testing.assert_allclose(out[n], want[..., 3:6], atol=2e-5)


def test_scanner_pair_blurs_input_and_target_by_their_fwhm_in_voxels():
    scanner = _scanner()
    stack = np.zeros((1, 33, 33, 2 * scanner.margin + 3), np.float32)
    stack[0, 16, 16, stack.shape[-1] // 2] = 1.0  # a point source in the centre slice
    lr, target, fwhm_px = scanner.pair(
        jnp.asarray(stack), jax.random.split(jax.random.key(0), 1), 3
    )
    assert float(fwhm_px[0]) == pytest.approx(4.0 / 2.0)
    sigma = sigma_of(4.0)
    want = ndi.gaussian_filter(
        stack[0], (sigma / 2.0, sigma / 2.0, sigma / 2.5), mode="constant", truncate=12
    )
    centre = stack.shape[-1] // 2
    np.testing.assert_allclose(np.asarray(lr)[0], want[..., centre - 1 : centre + 2], atol=1e-6)
    want_target = ndi.gaussian_filter(
        stack[0], (sigma / 4.0, sigma / 4.0, sigma / 5.0), mode="constant", truncate=12
    )
    np.testing.assert_allclose(np.asarray(target)[0, ..., 0], want_target[..., centre], atol=1e-5)


def test_scanner_noise_has_the_asked_voxel_cov_on_a_uniform_region():
    scanner = _scanner(noise_min=0.3, noise_max=0.3)
    stack = jnp.ones((4, 96, 96, 2 * scanner.margin + 1), jnp.float32)
    lr, _, _ = scanner.pair(stack, jax.random.split(jax.random.key(1), 4), 1)
    inner = np.asarray(lr)[:, 16:-16, 16:-16, 0]
    blurred = np.asarray(blur(stack, jnp.full(4, sigma_of(4.0) / 2.0)))[:, 16:-16, 16:-16, 0]
    cov = np.std(inner - blurred) / np.mean(blurred)
    assert cov == pytest.approx(0.3, rel=0.08)
    # Correlated like reconstruction noise: neighbouring voxels are not independent.
    noise = inner - blurred
    corr = np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1]
    assert corr > 0.3


def test_conserve_activity_keeps_block_sums_and_empties_the_air():
    rng = np.random.default_rng(2)
    sr = rng.normal(0.5, 0.5, (3, 21, 18, 1)).astype(np.float32)
    reference = rng.random((3, 21, 18, 1)).astype(np.float32)
    reference[:, :8, :8] = 0.0  # air: two whole 4×4 blocks and more
    out = np.asarray(conserve_activity(jnp.asarray(sr), jnp.asarray(reference), 4))
    assert out.min() >= 0
    assert np.all(out[:, :8, :8] == 0)
    pad = ((0, 0), (0, 3), (0, 2), (0, 0))
    sums = lambda x: np.pad(x, pad).reshape(3, 6, 4, 5, 4).sum(axis=(2, 4))  # noqa: E731
    np.testing.assert_allclose(sums(out), sums(reference), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.sum(), reference.sum(), rtol=1e-6)


def test_conserve_activity_on_a_shifted_grid_keeps_that_grid_s_block_sums():
    rng = np.random.default_rng(3)
    sr = rng.random((2, 13, 10, 1)).astype(np.float32)
    reference = rng.random((2, 13, 10, 1)).astype(np.float32)
    out = np.asarray(conserve_activity(jnp.asarray(sr), jnp.asarray(reference), 4, (1, 3)))
    # Blocks start 1 row and 3 columns before the corner: rows 0 | 1-4 | ..., columns 0 | 1-4 ...
    pad = ((0, 0), (1, 2), (3, 3), (0, 0))
    sums = lambda x: np.pad(x, pad).reshape(2, 4, 4, 4, 4).sum(axis=(2, 4))  # noqa: E731
    np.testing.assert_allclose(sums(out), sums(reference), rtol=1e-5, atol=1e-6)


def test_unblocked_anchor_keeps_total_activity_and_the_air_without_block_edges():
    # A smooth output anchored to a flat reference: one grid's scale factors step at every
    # block edge; averaged over the grid's offsets they do not.
    h = w = 32
    ramp = np.linspace(0.2, 1.0, w, dtype=np.float32)
    sr = np.broadcast_to(ramp**2, (1, h, w))[..., None].copy()
    reference = np.full((1, h, w, 1), 0.5, np.float32)
    reference[:, :, :12] = 0.0  # air on the left
    blocked = np.asarray(conserve_activity(jnp.asarray(sr), jnp.asarray(reference), 4))
    spun = np.asarray(conserve_activity_unblocked(jnp.asarray(sr), jnp.asarray(reference), 4))
    np.testing.assert_allclose(spun.sum(), reference.sum(), rtol=1e-5)
    assert spun.min() >= 0 and np.all(spun[:, :, :9] == 0)  # ≥ a block from the activity

    def edge_over_inner_steps(image):
        steps = np.abs(np.diff(image[0, h // 2, 16:, 0]))  # columns 16..31: activity only
        at_edges = steps[3::4]  # between columns 19|20, 23|24, 27|28
        inner = np.delete(steps, np.s_[3::4])
        return at_edges.mean() / inner.mean()

    assert edge_over_inner_steps(blocked) > 2.5, edge_over_inner_steps(spun)
    assert edge_over_inner_steps(spun) < 1.5, edge_over_inner_steps(spun)


def test_context_slices_reflect_at_the_volume_edges_as_numpy_pad():
    volume = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    context = data.context_slices(volume, np.arange(5), 2)
    padded = np.pad(volume, ((2, 2), (0, 0), (0, 0)), mode="reflect")
    for k in range(5):
        want = [padded[k + 2 + o] for o in (-2, -1, 1, 2)]
        np.testing.assert_array_equal(np.moveaxis(context[k], -1, 0), want)
    one = data.context_slices(volume[:1], np.arange(1), 1)
    np.testing.assert_array_equal(one[0, ..., 0], volume[0])


class _FirstChannels:
    """A stand-in network that returns its input channels: shows what the task feeds it."""

    def apply(self, variables, x):
        return x


def test_network_input_is_centre_then_neighbours_then_fwhm():
    task = Task(_scanner(noise_max=0.0), context=1)
    assert task.input_channels == 4
    hr = np.random.default_rng(3).random((2, 16, 16, 1)).astype(np.float32)
    context = np.random.default_rng(4).random((2, 16, 16, 2 * task.neighbours)).astype(np.float32)
    batch = {"hr": hr, "context": context}
    x = np.asarray(task.enhance(_FirstChannels(), None, batch, fwhm_px=3.0))
    # The activity projection of a non-negative centre on itself changes nothing.
    np.testing.assert_allclose(x[..., 0], hr[..., 0], rtol=1e-5)
    lr, _, fwhm = task.degrade(batch)
    raw = task._network_input(lr, batch, fwhm)
    np.testing.assert_allclose(raw[..., 0], lr[..., 1])  # centre first
    np.testing.assert_allclose(raw[..., 1], lr[..., 0])
    np.testing.assert_allclose(raw[..., 3], 2.0 / 4.0)  # 4 mm over 2 mm pixels, / 4


def test_bicubic_task_is_the_papers_degradation_and_target():
    hr = jnp.asarray(np.random.default_rng(5).random((2, 32, 32, 1)), jnp.float32)
    lr, sr, target = Task(Bicubic(8)).predict(_FirstChannels(), None, {"hr": hr})
    np.testing.assert_array_equal(np.asarray(lr), np.asarray(degrade(hr, 8)))
    np.testing.assert_array_equal(np.asarray(sr), np.asarray(lr))
    np.testing.assert_array_equal(np.asarray(target), np.asarray(hr))


def test_config_refuses_tasks_the_paper_domain_cannot_carry():
    config = build_config("deepsr", "tiny,paper")
    with config.unlocked():
        config.task.consistency = "block"
    with pytest.raises(ConfigError, match="data.domain=paper"):
        validate(config)
    config = build_config("deepsr", "tiny,scanner,model.in_channels=2")
    with pytest.raises(ConfigError, match="set model.in_channels=8"):
        validate(config)


def test_mr_dropout_zeroes_the_guidance_of_a_fraction_of_images_by_their_keys():
    rng = np.random.default_rng(3)
    batch = {
        "hr": jnp.asarray(rng.random((256, 8, 8, 1)), jnp.float32),
        "guide": jnp.asarray(rng.random((256, 8, 8, 1)) + 0.5, jnp.float32),
    }
    keys = jax.random.split(jax.random.key(1), 256)
    task = Task(Bicubic(2), guidance=("t1",), guide_dropout=0.3)
    guide, given = np.asarray(task.drop_guidance(batch, keys)["guide"]), np.asarray(batch["guide"])
    dropped = np.all(guide == 0, axis=(1, 2, 3))
    np.testing.assert_array_equal(guide[~dropped], given[~dropped])
    assert 0.2 < dropped.mean() < 0.4  # 77 of 256 expected; binomial sd 7
    again = np.asarray(task.drop_guidance(batch, keys)["guide"])
    np.testing.assert_array_equal(again, guide)  # the keys decide, so a resumed run draws alike
    assert Task(Bicubic(2), guidance=("t1",)).drop_guidance(batch, keys) is batch
    for arg, message in (
        ("tiny,mr.dropout=0.5", "set mr.t1=true"),
        ("tiny,mr,mr.dropout=1.0", r"in \[0, 1\)"),
    ):
        with pytest.raises(ConfigError, match=message):
            validate(build_config("deepsr", arg))
    assert Task.from_config(build_config("deepsr", "tiny,mr,mr.dropout=0.25")).guide_dropout == 0.25


@pytest.fixture(scope="module")
def scanner_run(tmp_path_factory):
    """A few steps of a tiny scanner-task DeepSR on 3 random shape phantoms."""
    from absl import flags

    from petsr_jax.train import train_and_evaluate

    flags.FLAGS.mark_as_parsed()
    workdir = tmp_path_factory.mktemp("scanner") / "run"
    config = build_config("deepsr", "tiny,scanner,scanner.phantoms=3")
    results = train_and_evaluate(config, workdir, progress=False)
    return workdir, results


def test_scanner_run_trains_scores_and_enhances_keeping_activity(scanner_run):
    import petsr_jax
    from petsr_jax.sim import phantoms

    workdir, results = scanner_run
    assert results["test"]["num_slices"] == phantoms.DEPTH
    assert np.isfinite(results["test"]["sr"]["psnr"])
    sr = petsr_jax.load(workdir)
    assert sr.task.context == 3 and sr.task.degradation.pixel_mm == phantoms.PIXEL_MM
    volume = phantoms.phantom_volume(7, seed=5)
    enhanced = sr(volume, psf_fwhm_mm=4.5)
    assert enhanced.data.shape == volume.data.shape and enhanced.data.min() >= 0
    assert enhanced.data.sum() == pytest.approx(volume.data.sum(), rel=1e-4)
    # The air stays empty: every 4×4 block of pixels lies within 8 px of its own pixels.
    air = ndi.maximum_filter(volume.data, size=(1, 17, 17)) == 0
    assert air.any() and np.all(enhanced.data[air] == 0)
    with pytest.warns(UserWarning, match="nominal_fwhm_mm"):
        sr(volume)


class _NeighbourChannel:
    """A stand-in network that returns its second input channel (a neighbouring slice)."""

    def apply(self, variables, x):
        return x[..., 1:2]


def test_a_bicubic_task_with_context_and_activity_kept_feeds_degraded_neighbours():
    task = Task(Bicubic(4), context=1, consistency="block", block=4)
    assert task.input_channels == 3 and task.neighbours == 1
    rng = np.random.default_rng(6)
    hr = rng.random((2, 16, 16, 1)).astype(np.float32)
    context = rng.random((2, 16, 16, 2)).astype(np.float32)
    batch = {"hr": hr, "context": context}
    lr, sr, target = task.predict(_NeighbourChannel(), None, batch)
    want = np.asarray(degrade(jnp.asarray(np.concatenate([context[..., :1], hr], -1)), 4))
    np.testing.assert_allclose(np.asarray(lr)[..., 0], want[..., 1], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(target), hr)
    # The network's output (here the neighbour) is rescaled to the centre input's block sums.
    sums = lambda x: np.asarray(x).reshape(2, 4, 4, 4, 4).sum(axis=(2, 4))  # noqa: E731
    np.testing.assert_allclose(sums(sr), sums(np.maximum(np.asarray(lr), 0)), rtol=1e-5)
    assert not np.allclose(np.asarray(sr), np.asarray(lr))


def test_lesion_weighted_loss_against_numpy():
    """w = 1 + 4 inside the lesion: sum(w·err²) / sum(w), the identity network on 2× bicubic."""
    rng = np.random.default_rng(7)
    hr = rng.random((2, 16, 16, 1)).astype(np.float32)
    lesion = np.zeros((2, 16, 16), np.float32)
    lesion[0, 4:8, 4:8] = 1
    lesion[1, 10:12, 2:9] = 1
    batch = {"hr": hr, "lesion": lesion}
    keys = jax.random.split(jax.random.key(0), 2)
    err = np.asarray(degrade(jnp.asarray(hr), 2)) - hr
    weight = 1 + 4 * lesion[..., None]
    want = np.sum(weight * err**2) / np.sum(weight)
    got = Task(Bicubic(2), lesion_weight=4.0).loss(_FirstChannels(), None, batch, keys)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    plain = Task(Bicubic(2)).loss(_FirstChannels(), None, batch, keys)
    np.testing.assert_allclose(float(plain), np.mean(err**2), rtol=1e-5)
    with pytest.raises(ValueError, match="lesion maps"):
        Task(Bicubic(2), lesion_weight=4.0).loss(_FirstChannels(), None, {"hr": hr}, keys)
    with pytest.raises(ConfigError, match="train.lesion_weight"):
        validate(build_config("deepsr", "tiny,train.lesion_weight=-1"))


def test_lesion_maps_are_cropped_and_flipped_with_the_slice(tmp_path, monkeypatch):
    """The training set of a root with lesion maps carries them (uint8, 1 inside), and every
    crop and flip moves them with the PET; a root without them is refused by patient."""
    import nibabel as nib
    from conftest import make_nifti_root

    monkeypatch.setenv("PETSR_CACHE_DIR", str(tmp_path / "cache"))
    root = make_nifti_root(tmp_path / "root", n_patients=2, slices=4, size=24)
    ids = sorted(data.list_patients(root))
    with pytest.raises(data.DataError, match=f"patient {ids[0]} has no lesion map"):
        data.build_slice_set(root, ids, eval_split=False, lesions=True)
    for pid in ids:  # a lesion wherever the PET is above half its maximum: hr > 0.5
        image = nib.load(root / f"{pid}.nii.gz")
        pet = np.asarray(image.dataobj)
        lesions = (pet > 0.5 * pet.max()).astype(np.uint8)
        (root / "lesions").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(lesions, image.affine), str(root / "lesions" / f"{pid}.nii.gz"))
    slices = data.build_slice_set(root, ids, eval_split=False, lesions=True)
    assert slices.lesion.dtype == np.uint8 and slices.lesion.shape == slices.hr.shape
    np.testing.assert_array_equal(slices.lesion, np.asarray(slices.hr) > 0.5)
    assert 0 < slices.lesion.mean() < 1
    cached = data.build_slice_set(root, ids, eval_split=False, lesions=True)
    np.testing.assert_array_equal(np.asarray(cached.lesion), slices.lesion)
    ds = data.train_dataset(data.SliceSource.of(slices), batch_size=4, seed=3, crop_size=12)
    for step in range(4):
        batch = ds[step]
        assert batch["lesion"].shape == (4, 12, 12)
        np.testing.assert_array_equal(batch["lesion"], batch["hr"][..., 0] > 0.5)
    assert data.build_slice_set(root, ids, eval_split=False).lesion is None


class _TwoOutputs:
    """A stand-in `Anchored` network: fixed guided and PET-only outputs, whatever it is fed."""

    def __init__(self, guided, pet_only):
        self.out = np.concatenate([guided, pet_only], axis=-1)

    def apply(self, variables, x):
        return jnp.asarray(self.out)


def test_anchored_output_keeps_the_pet_only_activity_per_block_and_trains_both():
    rng = np.random.default_rng(11)
    hr = rng.random((2, 16, 16, 1)).astype(np.float32)
    guided = rng.random((2, 16, 16, 1)).astype(np.float32)
    pet_only = rng.random((2, 16, 16, 1)).astype(np.float32)
    task = Task(Bicubic(2), guidance=("t1",), anchor_block=4)
    batch = {"hr": hr, "guide": hr}
    _, sr, target = task.predict(_TwoOutputs(guided, pet_only), None, batch)
    sr = np.asarray(sr)

    def block_sums(x):
        return x.reshape(2, 4, 4, 4, 4).sum(axis=(2, 4))

    np.testing.assert_allclose(block_sums(sr), block_sums(pet_only), rtol=1e-5)
    # Within a block the guided output's pattern is kept: sr ∝ guided there.
    ratio = sr[0, :4, :4, 0] / guided[0, :4, :4, 0]
    np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-5)
    keys = jax.random.split(jax.random.key(0), 2)
    loss = task.loss(_TwoOutputs(guided, pet_only), None, batch, keys)
    want = np.mean((sr - hr) ** 2) + np.mean((pet_only - hr) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_unblocked_anchor_is_the_mean_of_the_block_anchor_over_grid_offsets():
    rng = np.random.default_rng(12)
    hr = rng.random((1, 12, 12, 1)).astype(np.float32)
    guided = rng.random((1, 12, 12, 1)).astype(np.float32)
    pet_only = rng.random((1, 12, 12, 1)).astype(np.float32)
    task = Task(Bicubic(2), guidance=("t1",), anchor_block=3, anchor_unblocked=True)
    _, sr, _ = task.predict(_TwoOutputs(guided, pet_only), None, {"hr": hr, "guide": hr})
    # Each offset's blocks hold the PET-only activity (numpy, blocks cut by hand).
    want = np.zeros_like(guided)
    for top in range(3):
        for left in range(3):
            for rows in np.split(np.arange(-top, 15 - top), 5):
                for cols in np.split(np.arange(-left, 15 - left), 5):
                    r, c = rows[(rows >= 0) & (rows < 12)], cols[(cols >= 0) & (cols < 12)]
                    if len(r) and len(c):
                        block = np.ix_([0], r, c, [0])
                        want[block] += guided[block] * pet_only[block].sum() / guided[block].sum()
    np.testing.assert_allclose(np.asarray(sr), want / 9, rtol=1e-5)
    assert "at every grid offset" in task.describe()


def test_an_anchored_model_has_a_pet_only_branch_on_the_pet_channels():
    from petsr_jax.models import Anchored, create_model

    config = build_config("deepsr", "tiny,mr,mr.anchor_block=4")
    validate(config)
    model = create_model(config)
    assert isinstance(model, Anchored) and model.pet_channels == 1
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 2)))["params"]
    assert set(params) == {"pet", "guided"}
    assert params["pet"]["conv_in"]["kernel"].shape[2] == 1  # PET only
    assert params["guided"]["conv_in"]["kernel"].shape[2] == 2  # PET and T1
    with pytest.raises(ConfigError, match="mr.anchor_block"):
        validate(build_config("deepsr", "tiny,mr.anchor_block=4"))
    with pytest.raises(ConfigError, match="mr.anchor_unblocked"):
        validate(build_config("deepsr", "tiny,mr,mr.anchor_block=0,mr.anchor_unblocked=true"))
