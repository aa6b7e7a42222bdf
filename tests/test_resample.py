"""petsr_jax.io.resample: values against SimpleITK's resampler on the same physical grid, the
geometry checked on physical positions, headers and files describing the new grid."""

import numpy as np
import pytest

from petsr_jax import io
from petsr_jax.volume import Volume

sitk = pytest.importorskip("SimpleITK", reason="the [test] extra brings SimpleITK")

# A DICOM-like LPS grid: 4.07 mm pixels, 3.27 mm slices, the row axis pointing to -y (a flip),
# the origin somewhere in the patient.
SOURCE_AFFINE = np.array(
    [
        [4.07, 0.0, 0.0, -60.5],
        [0.0, -4.07, 0.0, 55.25],
        [0.0, 0.0, 3.27, -20.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def smooth_volume(shape=(7, 30, 28), seed=0) -> Volume:
    """Smooth positive blobs plus a ramp, in Bq/mL, on `SOURCE_AFFINE`."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    data = 100.0 + 5.0 * x + 2.0 * y
    for _ in range(5):
        centre = rng.uniform(0, shape)
        width = rng.uniform(2.0, 5.0)
        data += rng.uniform(500, 2000) * np.exp(
            -((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) / width**2
        )
    return Volume(
        data.astype(np.float32),
        (3.27, 4.07, 4.07),
        units="BQML",
        patient_id="p1",
        affine=SOURCE_AFFINE.copy(),
        space="LPS",
    )


def to_sitk(volume: Volume):
    """The volume as a SimpleITK image with the same physical grid (LPS, as ITK's)."""
    image = sitk.GetImageFromArray(np.asarray(volume.data, np.float64))  # array (z, y, x)
    axes = volume.affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)  # (x, y, z) = (column, row, slice)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in volume.affine[:3, 3]])
    image.SetDirection([float(v) for v in (axes / spacing).ravel()])
    return image


def sitk_resample_like(image, grid: Volume, interpolator=None):
    """SimpleITK's ResampleImageFilter onto `grid`'s voxel centres."""
    axes = grid.affine[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    resampler = sitk.ResampleImageFilter()
    resampler.SetOutputSpacing([float(s) for s in spacing])
    resampler.SetOutputOrigin([float(v) for v in grid.affine[:3, 3]])
    resampler.SetOutputDirection([float(v) for v in (axes / spacing).ravel()])
    resampler.SetSize([int(n) for n in grid.shape[::-1]])
    resampler.SetInterpolator(interpolator or sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0.0)
    return sitk.GetArrayFromImage(resampler.Execute(image))


def centres(volume: Volume) -> np.ndarray:
    """[slices, rows, cols, 3] physical positions of every voxel centre, from the affine."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    index = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    return (index @ volume.affine.T)[..., :3]


def test_linear_resampling_equals_simpleitk_on_the_same_grid():
    volume = smooth_volume()
    out = io.resample(volume, 2.34, slice_spacing_mm=2.0, antialias=False)
    assert out.shape == (11, 52, 49)  # round(7·3.27/2), round(30·4.07/2.34), round(28·4.07/2.34)
    want = sitk_resample_like(to_sitk(volume), out)
    np.testing.assert_allclose(out.data, want, rtol=1e-5, atol=1e-3)


def test_cubic_resampling_equals_simpleitk_bsplines_inside_the_volume():
    volume = smooth_volume()
    out = io.resample(volume, 3.0, method="cubic", antialias=False)
    want = sitk_resample_like(to_sitk(volume), out, sitk.sitkBSpline)
    # The two spline implementations extend the edges differently (scipy: edge value, ITK:
    # mirror); their values agree away from the edges.
    inner = (slice(2, -2), slice(4, -4), slice(4, -4))
    np.testing.assert_allclose(out.data[inner], want[inner], rtol=2e-3, atol=0.5)


def test_downsampling_smooths_first_as_a_gaussian_then_linear_resampling():
    volume = smooth_volume(shape=(4, 40, 36), seed=1)
    out = io.resample(volume, 8.14)  # twice the pixel size: σ = 0.5 source pixels
    image = to_sitk(volume)
    sigma_mm = 0.5 * 4.07
    smoothed = sitk.DiscreteGaussian(
        image,
        variance=[sigma_mm**2, sigma_mm**2, 0.0],
        maximumKernelWidth=64,
        maximumError=1e-4,
        useImageSpacing=True,
    )
    want = sitk_resample_like(smoothed, out)
    assert out.shape == (4, 20, 18)
    # ITK's discrete Gaussian (Bessel-function kernel) and scipy's sampled Gaussian differ by a
    # few tenths of a percent at the sharpest peaks; without smoothing the gap is far larger.
    np.testing.assert_allclose(out.data, want, rtol=5e-3, atol=1.0)
    without = io.resample(volume, 8.14, antialias=False)
    assert np.abs(out.data - want).max() < 0.2 * np.abs(without.data - want).max()


def test_every_voxel_centre_holds_the_value_at_its_physical_position():
    # A field linear in physical position is reproduced exactly by linear interpolation, so each
    # new voxel must hold the field at the position its affine gives it.
    volume = smooth_volume(shape=(6, 24, 20))
    gradient, constant = np.array([0.7, -1.3, 2.1]), 500.0
    field = centres(volume) @ gradient + constant
    volume = volume.replace(data=field.astype(np.float32))
    out = io.resample(volume, (2.5, 3.1), slice_spacing_mm=1.9, antialias=False)
    expected = centres(out) @ gradient + constant
    inner = (slice(1, -1), slice(1, -1), slice(1, -1))  # edges take the edge value
    np.testing.assert_allclose(out.data[inner], expected[inner], atol=2e-3)
    assert out.spacing == pytest.approx((1.9, 2.5, 3.1))
    assert np.linalg.norm(out.affine[:3, :3], axis=0) == pytest.approx([3.1, 2.5, 1.9])


def test_the_new_cells_cover_the_same_field_of_view_and_directions():
    volume = smooth_volume(shape=(5, 30, 20))
    out = io.resample(volume, 2.035)  # exactly half: 60 × 40 pixels
    assert out.shape == (5, 60, 40)
    for axis in range(3):
        old_axis, new_axis = volume.affine[:3, axis], out.affine[:3, axis]
        np.testing.assert_allclose(
            new_axis / np.linalg.norm(new_axis), old_axis / np.linalg.norm(old_axis)
        )
    # The outer corners of the first and last pixels of a slice stay where they were.
    for volume_, kind in ((volume, "old"), (out, "new")):
        _, rows, cols = volume_.shape
        near = volume_.affine @ [-0.5, -0.5, 0, 1]
        far = volume_.affine @ [cols - 0.5, rows - 0.5, 0, 1]
        if kind == "old":
            want_near, want_far = near, far
    np.testing.assert_allclose(near, want_near, atol=1e-9)
    np.testing.assert_allclose(far, want_far, atol=1e-9)
    np.testing.assert_allclose(out.affine[:3, 2], volume.affine[:3, 2])  # slices unchanged


def test_concentrations_and_total_activity_are_kept():
    volume = smooth_volume()
    for spacing in (2.34, 6.0):
        out = io.resample(volume, spacing)
        assert out.units == "BQML"
        total_in = volume.data.sum(dtype=np.float64) * np.prod(volume.spacing)
        total_out = out.data.sum(dtype=np.float64) * np.prod(out.spacing)
        assert total_out == pytest.approx(total_in, rel=0.03)
        assert out.data.mean() == pytest.approx(volume.data.mean(), rel=0.03)


def test_back_onto_the_input_grid_gives_its_geometry_and_values():
    volume = smooth_volume()
    at_training = io.resample(volume, 2.34)
    back = io.resample(at_training, like=volume)
    assert back.shape == volume.shape
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-9)
    assert back.spacing == pytest.approx(volume.spacing)
    # Two linear interpolations blur the narrowest blobs (2-pixel widths) a little; overall the
    # scan comes back, and its activity with it.
    rms = np.sqrt(np.mean((back.data - volume.data) ** 2)) / volume.data.mean()
    assert rms < 0.04
    assert back.data.sum() == pytest.approx(volume.data.sum(), rel=0.005)


def test_dicom_headers_and_written_series_describe_the_new_grid(tmp_path):
    source = smooth_volume(shape=(4, 30, 28))
    io.write_dicom(source, tmp_path / "source")
    volume = io.read_volume(tmp_path / "source")
    out = io.resample(volume, 2.34, slice_spacing_mm=2.5)
    assert len(out.headers) == out.shape[0]
    first = out.headers[0]
    assert (first.Rows, first.Columns) == out.shape[1:]
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([2.34, 2.34])
    assert first.ImageType[0] == "DERIVED"
    assert "resampled from" in first.DerivationDescription
    assert out.meta["resampled"]["from_spacing_mm"] == pytest.approx(list(volume.spacing))
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in out.headers])
    np.testing.assert_allclose(positions, centres(out)[:, 0, 0], atol=1e-3)

    io.write_dicom(out, tmp_path / "resampled")
    again = io.read_volume(tmp_path / "resampled")
    assert again.shape == out.shape
    np.testing.assert_allclose(again.affine, out.affine, atol=1e-3)
    np.testing.assert_allclose(again.data, out.data, rtol=1e-3, atol=0.1)


def test_a_nifti_volume_keeps_its_ras_space(tmp_path):
    ras = smooth_volume().replace(space="RAS", affine=SOURCE_AFFINE.copy())
    io.write_nifti(ras, tmp_path / "scan.nii.gz")
    volume = io.read_volume(tmp_path / "scan.nii.gz")
    out = io.resample(volume, 2.34)
    assert out.space == "RAS"
    io.write_nifti(out, tmp_path / "resampled.nii.gz")
    again = io.read_volume(tmp_path / "resampled.nii.gz")
    np.testing.assert_allclose(again.affine, out.affine, atol=1e-4)
    np.testing.assert_allclose(again.data, out.data, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spacing_mm": 0}, "positive number"),
        ({"spacing_mm": (1.0, 2.0, 3.0)}, "one number or (row, column)"),
        ({"spacing_mm": 2.0, "method": "nearest"}, "linear, cubic"),
        ({}, "give spacing_mm"),
    ],
)
def test_bad_arguments_say_what_is_expected(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        io.resample(smooth_volume(), **kwargs)


def test_a_grid_of_another_orientation_is_refused():
    volume = smooth_volume()
    turned = volume.replace(affine=SOURCE_AFFINE[:, [1, 0, 2, 3]].copy())
    with pytest.raises(ValueError, match="not parallel"):
        io.resample(volume, like=turned)
