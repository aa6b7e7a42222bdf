"""`petsr_jax.load` and the SuperResolver: kinds and units preserved, outputs equal to the
network applied by hand, reconstruct = `degrade` then the network, input checks, output plans."""

import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import petsr_jax
from petsr_jax import inference, io, train
from petsr_jax.data.degrade import degrade
from petsr_jax.run import checkpoint
from petsr_jax.volume import Volume


@pytest.fixture(scope="module")
def volume(nifti_root):
    return io.read_volume(nifti_root / "pat-03.nii.gz")


def _by_hand(tiny_deepsr, normalised_nhwc):
    """The network on normalised NHWC slices, without the SuperResolver's batching, negative
    activity clipped to 0 as outputs are."""
    out = tiny_deepsr.model.apply({"params": tiny_deepsr.params}, normalised_nhwc)
    return np.maximum(np.asarray(out), 0)


def test_load_restores_the_config_and_the_best_params(tiny_deepsr_workdir, tiny_deepsr):
    saved = json.loads((tiny_deepsr_workdir / "config.json").read_text())
    assert json.loads(tiny_deepsr.config.to_json()) == saved
    assert tiny_deepsr.scale == saved["scale"] == 8
    assert tiny_deepsr.config.model.name == "deepsr" and tiny_deepsr.model.num_blocks == 2
    assert tiny_deepsr.batch_size == saved["eval"]["batch_size"]
    assert tiny_deepsr.trained_units == "BQML"
    # Restored through a different path: the run's own initial params as the template.
    initial = train.init_state(
        tiny_deepsr.config, tiny_deepsr.model, train.make_optimizer(tiny_deepsr.config)
    ).params
    expected = checkpoint.restore_params(tiny_deepsr_workdir, initial, which="best")
    for a, b in zip(jax.tree.leaves(tiny_deepsr.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(  # trained, not the initialisation
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(tiny_deepsr.params), jax.tree.leaves(initial), strict=True)
    )


def test_enhance_keeps_kind_shape_and_units_and_equals_the_network_by_hand(tiny_deepsr, volume):
    data = volume.data
    peak = data.max()
    expected = _by_hand(tiny_deepsr, (data / peak)[..., None])[..., 0] * peak

    stack = tiny_deepsr(data, batch_size=3)  # 8 slices: batches of 3, 3 and a zero-filled 2
    assert isinstance(stack, np.ndarray) and stack.shape == data.shape
    assert stack.dtype == np.float32
    np.testing.assert_allclose(stack, expected, rtol=1e-5, atol=1e-5 * peak)
    assert np.abs(stack - data).max() > 1e-3 * peak, "the network changed nothing"

    enhanced = tiny_deepsr(volume)
    assert isinstance(enhanced, Volume)
    assert enhanced.shape == volume.shape and enhanced.units == volume.units == "BQML"
    assert enhanced.spacing == volume.spacing and enhanced.patient_id == volume.patient_id
    np.testing.assert_array_equal(enhanced.affine, volume.affine)
    np.testing.assert_allclose(enhanced.data, expected, rtol=1e-5, atol=1e-5 * peak)

    one = data[4]
    single = tiny_deepsr(one)
    assert single.shape == one.shape
    by_hand = _by_hand(tiny_deepsr, (one / one.max())[None, ..., None])[0, ..., 0] * one.max()
    np.testing.assert_allclose(single, by_hand, rtol=1e-5, atol=1e-5 * one.max())


def test_any_slice_size_runs_unpadded(tiny_deepsr):
    rng = np.random.default_rng(0)
    odd = rng.uniform(100.0, 5000.0, (3, 20, 27)).astype(np.float32)
    out = tiny_deepsr(odd)
    assert out.shape == odd.shape
    expected = _by_hand(tiny_deepsr, (odd / odd.max())[..., None])[..., 0] * odd.max()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * odd.max())


def test_reconstruct_degrades_with_degrade_then_recovers(tiny_deepsr, volume):
    peak = volume.data.max()
    lr_up = np.asarray(degrade(jnp.asarray(volume.data / peak)[..., None], tiny_deepsr.scale))
    bicubic, sr = tiny_deepsr.reconstruct(volume)
    assert isinstance(bicubic, Volume) and isinstance(sr, Volume)
    assert bicubic.units == sr.units == "BQML"
    np.testing.assert_allclose(bicubic.data, lr_up[..., 0] * peak, rtol=1e-5, atol=1e-5 * peak)
    np.testing.assert_allclose(
        sr.data, _by_hand(tiny_deepsr, lr_up)[..., 0] * peak, rtol=1e-5, atol=1e-5 * peak
    )
    two_d = tiny_deepsr.reconstruct(volume.data[2])
    assert two_d.bicubic.shape == two_d.sr.shape == volume.shape[1:]


def test_bad_inputs_are_refused_with_a_reason(tiny_deepsr, volume, tmp_path):
    with pytest.raises(inference.InferenceError, match=r"shape \(1, 2, 8, 8\)"):
        tiny_deepsr(np.ones((1, 2, 8, 8)))
    with pytest.raises(inference.InferenceError, match="maximum"):
        tiny_deepsr(np.zeros((8, 8)))
    with pytest.raises(inference.InferenceError, match="NaN"):
        tiny_deepsr(np.full((8, 8), np.nan))
    with pytest.raises(inference.IncompatibleInput, match="MGMINML.*BQML"):
        tiny_deepsr(volume.replace(units="MGMINML"))
    with pytest.raises(inference.InferenceError, match="config.json"):
        petsr_jax.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "deepsr"}}))
    with pytest.raises(inference.InferenceError, match="scale"):
        petsr_jax.load(tmp_path)


def test_a_config_saved_before_newer_fields_gets_their_defaults(tiny_deepsr_workdir, tmp_path):
    saved = json.loads((tiny_deepsr_workdir / "config.json").read_text())
    del saved["eval"]["batch_size"], saved["model"]["in_channels"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = inference.read_config(tmp_path)
    assert config.eval.batch_size == 8 and config.model.in_channels == 1  # base_config's
    assert config.model.num_blocks == 2 and config.scale == 8  # the run's own values
    with pytest.raises(AttributeError):
        config.new_field = 1  # locked, like a config built by build_config


def test_workdir_without_checkpoints_names_the_folder(tiny_deepsr_workdir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_deepsr_workdir / "config.json").read_text())
    with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path)):
        petsr_jax.load(tmp_path)


def test_unknown_training_units_accept_with_a_warning(tiny_deepsr, volume):
    unchecked = inference.SuperResolver(tiny_deepsr.config, tiny_deepsr.params, data_info=None)
    with pytest.warns(UserWarning, match="no data_info.json"):
        out = unchecked(volume.replace(units="SUVbw"))
    assert out.units == "SUVbw"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_deepsr(volume)  # matching units: no warning


def test_a_change_of_unit_is_enhanced_with_a_warning_in_the_input_units(tiny_deepsr, volume):
    in_bqml = tiny_deepsr(volume)
    suv = volume.replace(data=volume.data / 5e3, units="SUVbw")
    with pytest.warns(UserWarning, match="SUVbw.*BQML.*constant factor"):
        in_suv = tiny_deepsr(suv)
    assert in_suv.units == "SUVbw"
    np.testing.assert_allclose(in_suv.data, in_bqml.data / 5e3, rtol=1e-4, atol=1e-6)
    with pytest.warns(UserWarning, match="kBq/mL"):
        tiny_deepsr(volume.replace(data=volume.data / 1e3, units="kBq/mL"))


def test_another_quantity_or_modality_is_refused_naming_the_override(tiny_deepsr, volume):
    from pydicom.dataset import Dataset

    parametric = volume.replace(units="MGMINML")  # a Patlak glucose-rate map, not activity
    with pytest.raises(inference.IncompatibleInput, match="check_units=False.*--allow_units"):
        tiny_deepsr(parametric)
    with pytest.warns(UserWarning, match="MGMINML.*enhanced anyway"):
        assert tiny_deepsr(parametric, check_units=False).units == "MGMINML"
    ct = volume.replace(headers=[Dataset()] * volume.shape[0])
    ct.headers[0].Modality = "CT"
    with pytest.raises(inference.IncompatibleInput, match="modality CT, not PET"):
        tiny_deepsr.check_input(ct)


def test_negative_activity_is_clipped_and_counted(tiny_deepsr, volume, monkeypatch):
    def undershooting(slices, **_):
        return slices - 0.5  # a network that rings below zero

    monkeypatch.setattr(tiny_deepsr, "enhance_normalised", undershooting)
    enhanced = tiny_deepsr(volume)
    peak = volume.data.max()
    expected = np.maximum(volume.data - 0.5 * peak, 0)
    np.testing.assert_allclose(enhanced.data, expected, rtol=1e-6, atol=1e-6 * peak)
    assert enhanced.meta["clipped_voxels"] == np.count_nonzero(volume.data < 0.5 * peak) > 0
    assert tiny_deepsr(volume.data).min() == 0.0  # arrays are clipped too


def test_pixel_spacing_not_matrix_size_is_compared_with_the_training_data(tiny_deepsr, volume):
    assert tiny_deepsr.data_info["pixel_spacing_mm"] == [2.0, 2.0]  # make_nifti_root's spacing
    smaller_matrix = volume.replace(data=np.ones((2, 16, 16), np.float32))
    assert tiny_deepsr.check_input(smaller_matrix) == []
    within_tolerance = volume.replace(spacing=(2.0, 2.1, 2.1))
    assert tiny_deepsr.check_input(within_tolerance) == []
    [problem] = tiny_deepsr.check_input(volume.replace(spacing=(2.0, 2.6, 2.6)))
    assert "2.6 × 2.6 mm" in problem and "2 × 2 mm" in problem and "data_info.json" in problem
    with pytest.warns(UserWarning, match="pixels are 2.6 × 2.6 mm"):
        tiny_deepsr(volume.replace(spacing=(2.0, 2.6, 2.6)))


def test_a_model_with_prior_channels_is_refused_on_pet_alone(tiny_deepsr, volume):
    fields = json.loads(tiny_deepsr.config.to_json())
    fields["model"]["in_channels"] = 2
    config = ml_collections.ConfigDict(fields)
    two_channel = inference.SuperResolver(config, tiny_deepsr.params)
    with pytest.raises(inference.IncompatibleInput, match="2 input channels"):
        two_channel(volume.data)


# ------------------------------------------------------------------------- output planning


def _dicom_folder(path, seed=0):
    rng = np.random.default_rng(seed)
    vol = Volume(rng.uniform(1, 100, (3, 8, 8)).astype(np.float32), (2.0, 2.0, 2.0), "BQML")
    io.write_dicom(vol, path)
    return path


def test_plan_reads_a_patients_root_like_a_data_root(nifti_root, tmp_path):
    jobs = inference.plan_outputs(nifti_root, tmp_path / "out")
    assert [j.name for j in jobs] == ["pat-00", "pat-01", "pat-02", "pat-03"]  # masks/ skipped
    assert all(j.dicom_dir is None and j.nifti_path.name == f"{j.name}.nii.gz" for j in jobs)
    both = inference.plan_outputs(nifti_root / "pat-01.nii.gz", tmp_path / "out", "both")
    assert [(j.dicom_dir, j.nifti_path) for j in both] == [
        (tmp_path / "out" / "pat-01", tmp_path / "out" / "pat-01.nii.gz")
    ]
    series = _dicom_folder(tmp_path / "scan")
    (job,) = inference.plan_outputs(series, tmp_path / "out")
    assert job.name == "scan" and job.dicom_dir == tmp_path / "out" / "scan"
    assert job.nifti_path is None


def test_plan_refuses_to_touch_the_input_or_existing_outputs(nifti_root, tmp_path):
    series = _dicom_folder(tmp_path / "scan")
    with pytest.raises(inference.InferenceError, match="inside the input"):
        inference.plan_outputs(series, series / "enhanced")
    with pytest.raises(inference.InferenceError, match="overwrite the input"):
        inference.plan_outputs(nifti_root / "pat-00.nii.gz", nifti_root, "nifti")
    (tmp_path / "out" / "scan").mkdir(parents=True)
    inference.plan_outputs(series, tmp_path / "out")  # an empty folder may be filled
    (tmp_path / "out" / "scan" / "old.dcm").write_bytes(b"x")
    with pytest.raises(inference.InferenceError, match="already exists and is not empty"):
        inference.plan_outputs(series, tmp_path / "out")
    with pytest.raises(inference.InferenceError, match="no such file"):
        inference.plan_outputs(tmp_path / "missing", tmp_path / "out")


def test_the_readme_notebook_lines_run(tiny_deepsr_workdir, nifti_root, tmp_path):
    """The README's notebook snippet, run as written on a tiny run and a DICOM series."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"```python\n(import petsr_jax\n.*?)```", readme, re.S).group(1)
    scan = tmp_path / "scan_dicom"
    io.write_dicom(io.read_volume(nifti_root / "pat-03.nii.gz"), scan)
    code = (
        snippet.replace('"runs/deepsr_x8_small_b6"', repr(str(tiny_deepsr_workdir)))
        .replace('"/data/scan_dicom"', repr(str(scan)))
        .replace('"enhanced_series/"', repr(str(tmp_path / "enhanced_series")))
    )
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    volume, enhanced = namespace["volume"], namespace["enhanced"]
    assert isinstance(enhanced, Volume) and enhanced.shape == volume.shape
    assert namespace["restored"].shape == volume.shape
    assert io.read_volume(tmp_path / "enhanced_series").shape == volume.shape
