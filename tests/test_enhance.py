"""launch/enhance.py end to end, as a user runs it: outputs readable with the input's geometry
and units, values equal to the library's, the input untouched, and every refusal case."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pydicom
import pytest
from skimage.metrics import peak_signal_noise_ratio

from petsr_jax import io
from petsr_jax.data.degrade import degrade

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dicom_input(nifti_root, tmp_path_factory):
    """A PET DICOM series folder of one patient, as a scanner export would be."""
    folder = tmp_path_factory.mktemp("scans") / "patient_a"
    io.write_dicom(io.read_volume(nifti_root / "pat-03.nii.gz"), folder)
    return folder


def _enhance(*args, timeout=300):
    # No tcmalloc re-execution (a second interpreter start): the allocator is not checked here.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PETSR_ALLOCATOR": "system"}
    cmd = [sys.executable, str(REPO / "launch" / "enhance.py"), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _digest(folder: Path) -> str:
    h = hashlib.sha1()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_enhance_writes_dicom_and_nifti_in_the_input_geometry(
    tiny_deepsr_workdir, tiny_deepsr, dicom_input, tmp_path
):
    before = _digest(dicom_input)
    out = tmp_path / "out"
    run = _enhance(
        f"--workdir={tiny_deepsr_workdir}",
        f"--input={dicom_input}",
        f"--output={out}",
        "--format=both",
        "--batch_size=3",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert _digest(dicom_input) == before, "the input series changed"

    source = io.read_volume(dicom_input)
    expected = tiny_deepsr(source)
    dicom = io.read_volume(out / "patient_a")
    nifti = io.read_volume(out / "patient_a.nii.gz")
    for result in (dicom, nifti):
        assert result.shape == source.shape and result.units == source.units == "BQML"
        np.testing.assert_allclose(result.spacing, source.spacing, rtol=1e-5)
    np.testing.assert_allclose(dicom.affine, source.affine, atol=1e-4)
    np.testing.assert_allclose(nifti.affine, np.diag([-1, -1, 1, 1]) @ source.affine, atol=1e-4)
    # 16-bit storage with one slope per slice: within half a slope of the computed values.
    step = np.abs(expected.data).max(axis=(1, 2), keepdims=True) / 32767
    assert np.all(np.abs(dicom.data - expected.data) <= step)
    np.testing.assert_allclose(nifti.data, expected.data, rtol=1e-5, atol=1e-3)
    assert np.abs(expected.data - source.data).max() > 1e-3 * source.data.max()

    header = pydicom.dcmread(sorted((out / "patient_a").iterdir())[0], stop_before_pixels=True)
    assert header.SeriesDescription == "SR deepsr x8 enhance tiny_deepsr_run"
    assert list(header.ImageType)[:2] == ["DERIVED", "PRIMARY"] and header.Units == "BQML"
    assert header.SeriesInstanceUID != source.series_uid
    assert header.StudyInstanceUID == source.headers[0].StudyInstanceUID


def test_reconstruct_mode_prints_scores_against_the_original(
    tiny_deepsr_workdir, tiny_deepsr, dicom_input, tmp_path
):
    out = tmp_path / "out"
    run = _enhance(
        f"--workdir={tiny_deepsr_workdir}",
        f"--input={dicom_input}",
        f"--output={out}",
        "--mode=reconstruct",
        "--format=nifti",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    row = re.search(r"^patient_a\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", run.stdout, re.M)
    assert row, run.stdout
    slices, bicubic_psnr, sr_psnr, bicubic_ssim, sr_ssim = row.groups()

    source = io.read_volume(dicom_input)
    hr = source.data / source.data.max()
    non_empty = hr.reshape(len(hr), -1).max(axis=1) > 0  # all-zero slices are left out
    assert int(slices) == int(non_empty.sum())
    lr_up = np.asarray(degrade(jnp.asarray(hr)[..., None], 8))[..., 0]
    expected = np.mean(
        [
            peak_signal_noise_ratio(h, b, data_range=1)
            for h, b in zip(hr[non_empty], lr_up[non_empty], strict=True)
        ]
    )
    assert float(bicubic_psnr) == pytest.approx(expected, abs=5e-3)  # printed with 2 decimals
    assert all(np.isfinite(float(v)) for v in (sr_psnr, bicubic_ssim, sr_ssim))

    written = io.read_volume(out / "patient_a.nii.gz")
    recovered = tiny_deepsr.reconstruct(source).sr
    np.testing.assert_allclose(written.data, recovered.data, rtol=1e-5, atol=1e-3)


def test_refuses_an_output_inside_the_input(tiny_deepsr_workdir, dicom_input):
    before = _digest(dicom_input)
    run = _enhance(
        f"--workdir={tiny_deepsr_workdir}", f"--input={dicom_input}", f"--output={dicom_input}/sr"
    )
    assert run.returncode != 0 and "inside the input" in run.stderr
    assert _digest(dicom_input) == before and not (dicom_input / "sr").exists()


def test_refuses_an_existing_output(tiny_deepsr_workdir, dicom_input, tmp_path):
    existing = tmp_path / "out" / "patient_a"
    existing.mkdir(parents=True)
    (existing / "earlier.dcm").write_bytes(b"earlier result")
    run = _enhance(
        f"--workdir={tiny_deepsr_workdir}", f"--input={dicom_input}", f"--output={tmp_path / 'out'}"
    )
    assert run.returncode != 0 and "already exists and is not empty" in run.stderr
    assert [p.name for p in existing.iterdir()] == ["earlier.dcm"]


def test_refuses_an_unknown_mode(tiny_deepsr_workdir, dicom_input, tmp_path):
    run = _enhance(
        f"--workdir={tiny_deepsr_workdir}",
        f"--input={dicom_input}",
        f"--output={tmp_path}/out",
        "--mode=sharpen",
    )
    assert run.returncode != 0 and "--mode" in run.stderr and "enhance" in run.stderr
    assert not (tmp_path / "out").exists()


def test_a_change_of_unit_is_enhanced_and_activity_changes_are_printed_and_recorded(
    tiny_deepsr_workdir, nifti_root, tmp_path
):
    source = io.read_volume(nifti_root / "pat-03.nii.gz")
    suv = source.replace(data=source.data / 5e3, units="SUVbw")
    io.write_nifti(suv, tmp_path / "suv.nii.gz")
    run = _enhance(
        f"--workdir={tiny_deepsr_workdir}",
        f"--input={tmp_path / 'suv.nii.gz'}",
        f"--output={tmp_path}/out",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "SUVbw" in run.stderr and "constant factor" in run.stderr
    result = io.read_volume(tmp_path / "out" / "suv.nii.gz")
    assert result.units == "SUVbw" and result.data.min() >= 0
    record = json.loads((tmp_path / "out" / "activity_changes.json").read_text())["suv"]
    total = result.data.astype(np.float64).sum() / suv.data.astype(np.float64).sum() - 1
    peak = result.data.max() / suv.data.max() - 1
    assert record["total_change"] == pytest.approx(total, abs=1e-5)
    assert record["max_change"] == pytest.approx(peak, abs=1e-5)
    assert record["units"] == "SUVbw" and record["voxels"] == suv.data.size
    printed = f"suv: activity vs input: total {total * 100:+.1f} %, max {peak * 100:+.1f} %"
    assert printed.replace("-", "−") in run.stdout + run.stderr


def test_refuses_another_quantity_unless_allowed(tiny_deepsr_workdir, nifti_root, tmp_path):
    source = io.read_volume(nifti_root / "pat-03.nii.gz")
    io.write_nifti(source.replace(units="MGMINML"), tmp_path / "patlak.nii.gz")
    args = (
        f"--workdir={tiny_deepsr_workdir}",
        f"--input={tmp_path / 'patlak.nii.gz'}",
        f"--output={tmp_path}/out",
    )
    run = _enhance(*args)
    assert run.returncode != 0
    assert "MGMINML" in run.stderr and "--allow_units" in run.stderr
    assert not (tmp_path / "out").exists()
    run = _enhance(*args, "--allow_units")
    assert run.returncode == 0, run.stderr[-3000:]
    assert io.read_volume(tmp_path / "out" / "patlak.nii.gz").units == "MGMINML"
