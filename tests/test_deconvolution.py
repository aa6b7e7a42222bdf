"""Richardson–Lucy deconvolution (petsr_jax/deconvolution.py) and launch/deconvolve.py.

The reference is scikit-image's `richardson_lucy` with the same PSF kernel (scipy's Gaussian
weights, read off a blurred impulse) on an image whose zero border is wide enough that
skimage's zero padding and our symmetric boundary cannot differ.
"""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fresh_python_env
from scipy import ndimage
from skimage.restoration import richardson_lucy as skimage_richardson_lucy

from petsr_jax import Volume, deconvolution, io

REPO = Path(__file__).resolve().parents[1]


def _kernel(sigma) -> np.ndarray:
    """The 3D kernel `gaussian_filter` applies for `sigma` voxels (truncate 4): a blurred
    impulse."""
    radius = [int(4.0 * s + 0.5) for s in sigma]
    impulse = np.zeros([2 * r + 1 for r in radius])
    impulse[tuple(radius)] = 1.0
    return ndimage.gaussian_filter(impulse, sigma, mode="constant")


def test_matches_skimage_richardson_lucy_with_the_same_kernel():
    sigma = (1.0, 1.4, 1.2)
    rng = np.random.default_rng(0)
    image = np.zeros((36, 44, 40))
    # Content well inside: a zero border wider than twice the kernel's reach on every side.
    image[12:24, 13:31, 12:28] = rng.gamma(2.0, 1.0, (12, 18, 16))
    image = ndimage.gaussian_filter(image, 1.0, mode="constant")
    iterations = 12
    expected = skimage_richardson_lucy(image, _kernel(sigma), num_iter=iterations, clip=False)
    result = deconvolution.richardson_lucy(image, sigma, iterations, start=0.5)
    np.testing.assert_allclose(result, expected, rtol=1e-7, atol=1e-9 * image.max())


def test_total_activity_is_kept_and_nothing_goes_negative():
    rng = np.random.default_rng(1)
    # Activity up to the array's edges, where a blur with zero padding would lose some.
    image = ndimage.gaussian_filter(rng.gamma(1.0, 100.0, (20, 30, 26)), 0.7, mode="reflect")
    image[0, 0, :5] = -3.0  # negative input (noise of a reconstruction) is set to 0 first
    result = deconvolution.richardson_lucy(image, (0.8, 1.5, 1.5), 25)
    assert result.min() >= 0
    assert result.sum() == pytest.approx(np.maximum(image, 0).sum(), rel=1e-12)


def test_iterations_bring_a_blurred_object_back_towards_it():
    truth = np.zeros((24, 40, 40))
    truth[8:16, 12:28, 14:26] = 10.0
    truth[11:13, 18:20, 18:20] = 30.0
    sigma = (1.0, 1.5, 1.5)
    blurred = deconvolution.blur(truth, sigma)
    errors = [
        np.abs(deconvolution.richardson_lucy(blurred, sigma, n) - truth).mean()
        for n in (0, 5, 20, 60)
    ]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.6 * errors[0]


def test_psf_in_mm_becomes_sigma_in_voxels_per_axis():
    spacing = (2.78, 2.08, 2.08)
    to_sigma = 2 * math.sqrt(2 * math.log(2))
    assert deconvolution.sigma_voxels(4.3, spacing) == pytest.approx(
        [4.3 / to_sigma / 2.78, 4.3 / to_sigma / 2.08, 4.3 / to_sigma / 2.08]
    )
    axial, *in_plane = deconvolution.sigma_voxels((4.3, 6.0), spacing)
    assert axial == pytest.approx(6.0 / to_sigma / 2.78)
    assert in_plane == pytest.approx([4.3 / to_sigma / 2.08] * 2)
    for bad in (-1.0, float("nan"), (4.3, 5.0, 6.0)):
        with pytest.raises(deconvolution.DeconvolutionError):
            deconvolution.sigma_voxels(bad, spacing)
    with pytest.raises(deconvolution.DeconvolutionError, match="iterations"):
        deconvolution.richardson_lucy(np.ones((3, 3, 3)), (1, 1, 1), -2)


def test_deconvolve_keeps_units_geometry_and_records_what_it_did():
    affine = np.array([[2.0, 0, 0, -50], [0, 2.0, 0, -40], [0, 0, 3.0, 10], [0, 0, 0, 1]])
    data = ndimage.gaussian_filter(np.random.default_rng(2).gamma(2.0, 50.0, (8, 20, 20)), 1.0)
    volume = Volume(data, (3.0, 2.0, 2.0), units="BQML", affine=affine)
    result = deconvolution.deconvolve(volume, (4.0, 5.0), 3)
    assert result.units == "BQML" and result.spacing == volume.spacing
    np.testing.assert_array_equal(result.affine, affine)
    record = result.meta["deconvolution"]
    assert record["iterations"] == 3 and record["psf_fwhm_mm"] == [4.0, 5.0]
    assert result.data.dtype == np.float32
    assert float(result.data.sum(dtype=np.float64)) == pytest.approx(data.sum(), rel=1e-6)


def _launch(*args, cwd):
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "deconvolve.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=fresh_python_env(),
        cwd=cwd,
        timeout=600,
    )


def test_deconvolve_scan_writes_a_nifti_in_the_input_geometry(tmp_path):
    data = ndimage.gaussian_filter(np.random.default_rng(3).gamma(2.0, 500.0, (10, 24, 24)), 1.2)
    source = io.write_nifti(Volume(data, (2.5, 2.0, 2.0), units="BQML"), tmp_path / "scan.nii.gz")
    output = tmp_path / "rl.nii.gz"
    said = deconvolution.deconvolve_scan(source, output, psf_fwhm_mm=4.3, iterations=5)
    assert "total +0.0 %" in said or "total −0.0 %" in said, said
    before, after = io.read_volume(source), io.read_volume(output)
    np.testing.assert_allclose(after.affine, before.affine)
    assert after.units == "BQML" and after.shape == before.shape
    expected = deconvolution.deconvolve(before, 4.3, 5).data
    np.testing.assert_allclose(after.data, expected, rtol=1e-5, atol=1e-3)
    with pytest.raises(io.ScanError, match="already exists"):
        deconvolution.deconvolve_scan(source, output, psf_fwhm_mm=4.3, iterations=5)


def test_launch_refuses_a_bad_psf_with_one_line_and_writes_nothing(tmp_path):
    source = io.write_nifti(Volume(np.ones((4, 8, 8)), (2.0, 2.0, 2.0)), tmp_path / "scan.nii.gz")
    refused = _launch(
        f"--input={source}", f"--output={tmp_path / 'bad.nii.gz'}", "--psf_fwhm_mm=-1", cwd=tmp_path
    )
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "PSF FWHM" in lines[0], refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]
