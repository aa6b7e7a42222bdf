"""Tests of `petsr_jax.io`: DICOM and NIfTI reading and writing.

Synthetic series are written here with pydicom directly (not with `write_dicom`), and values and
geometry are checked against SimpleITK (GDCM / ITK's NIfTI reader) and nibabel, so the reader and
the writer are each held to an implementation that is not theirs. The DICOM validator
`dciodvfy` (Debian package dicom3tools) checks the written series against the PET Image IOD.
"""

from __future__ import annotations

import datetime
import errno
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage, generate_uid

from petsr_jax import io
from petsr_jax.volume import Volume

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is the independent DICOM/NIfTI reader")

NEMA_SERIES = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "nema-iq-pet" / "pet_recon_1"
)
needs_nema = pytest.mark.skipif(
    not NEMA_SERIES.is_dir(), reason=f"real PET series not found at {NEMA_SERIES}"
)
needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None or shutil.which("dcentvfy") is None,
    reason="dciodvfy/dcentvfy not on PATH (apt-get install dicom3tools)",
)

SLICES, ROWS, COLUMNS = 6, 32, 40
# Oblique orientation whose slice normal points towards -z: ordering slices by their z
# coordinate, or by file name / InstanceNumber, gives the wrong order.
TILT = np.deg2rad(120.0)
ROW_DIRECTION = np.array([1.0, 0.0, 0.0])
COLUMN_DIRECTION = np.array([0.0, np.cos(TILT), -np.sin(TILT)])
NORMAL = np.cross(ROW_DIRECTION, COLUMN_DIRECTION)
PIXEL_SPACING = (2.0, 1.5)  # (between rows, between columns)
SLICE_SPACING = 2.5
ORIGIN = np.array([-30.0, 12.5, 40.0])


def _file_meta(sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = PositronEmissionTomographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def write_synthetic_series(
    folder: Path,
    *,
    signed: bool = False,
    seed: int = 0,
    slices: int = SLICES,
    rows: int = ROWS,
    columns: int = COLUMNS,
    series_uid: str | None = None,
    modality: str = "PT",
    description: str = "synthetic",
    edit=None,
) -> np.ndarray:
    """A PET series in shuffled, nested files; returns the expected values in position order.

    Every slice has its own slope (and a non-zero intercept), InstanceNumbers are shuffled
    independently of positions and file names. `edit(k, dataset)` may alter slice k.
    """
    rng = np.random.default_rng(seed)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    dtype = np.int16 if signed else np.uint16
    low = -2000 if signed else 0
    stored = rng.integers(low, 30000, size=(slices, rows, columns)).astype(dtype)
    slopes = rng.uniform(0.05, 3.0, size=slices)
    intercepts = rng.uniform(-5.0, 5.0, size=slices) if signed else np.zeros(slices)
    instance_numbers = rng.permutation(slices) + 1
    file_order = rng.permutation(slices)
    for k in range(slices):
        sop_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = _file_meta(sop_uid)
        ds.SOPClassUID = PositronEmissionTomographyImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.Modality = modality
        ds.PatientID = "P001"
        ds.PatientName = "Synthetic^Patient"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesDescription = description
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImageOrientationPatient = [*ROW_DIRECTION, *COLUMN_DIRECTION]
        ds.ImagePositionPatient = [float(v) for v in ORIGIN + k * SLICE_SPACING * NORMAL]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = 9.0  # deliberately not the spacing: the reader must use positions
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = int(signed)
        ds.RescaleSlope = f"{slopes[k]:.10g}"
        ds.RescaleIntercept = f"{intercepts[k]:.10g}"
        ds.Units = "BQML"
        ds.PixelData = stored[k].tobytes()
        if edit is not None:
            edit(k, ds)
        path = folder / f"sub{file_order[k] % 2}" / f"img{file_order[k]:03d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    slopes = np.array([float(f"{s:.10g}") for s in slopes])
    intercepts = np.array([float(f"{i:.10g}") for i in intercepts])
    return stored * slopes[:, None, None] + intercepts[:, None, None]


def read_with_simpleitk(folder: Path):
    """SimpleITK's series read (GDCM's sort by position) as (array [z, y, x], image, files)."""
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder), recursive=True)
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat64)
    image = reader.Execute()
    return sitk.GetArrayFromImage(image), image, files


def affine_from_simpleitk(image) -> np.ndarray:
    affine = np.eye(4)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return affine


def assert_valid_pet_series(files) -> None:
    """dciodvfy on every file and dcentvfy on the series report no error."""
    for path in files:
        result = subprocess.run(
            ["dciodvfy", "-new", str(path)], capture_output=True, text=True, check=False
        )
        report = result.stdout + result.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert "PETImage" in report
        assert not errors and result.returncode == 0, f"{path}:\n" + "\n".join(errors)
    result = subprocess.run(
        ["dcentvfy", *map(str, files)], capture_output=True, text=True, check=False
    )
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
    assert not errors and result.returncode == 0, "\n".join(errors)


def test_read_orders_slices_by_position_like_simpleitk(tmp_path):
    expected = write_synthetic_series(tmp_path)
    volume = io.read_volume(tmp_path)
    reference, image, files = read_with_simpleitk(tmp_path)

    np.testing.assert_allclose(volume.data, expected, rtol=1e-6)
    np.testing.assert_allclose(volume.data, reference, rtol=1e-6)
    assert [h.SOPInstanceUID for h in volume.headers] == [
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files
    ]
    np.testing.assert_allclose(volume.affine, affine_from_simpleitk(image), atol=1e-6)
    np.testing.assert_allclose(volume.spacing, (SLICE_SPACING, *PIXEL_SPACING), rtol=1e-6)
    assert volume.units == "BQML" and volume.patient_id == "P001" and volume.space == "LPS"
    assert all("PixelData" not in h for h in volume.headers)


def test_read_signed_pixels_with_intercept(tmp_path):
    expected = write_synthetic_series(tmp_path, signed=True, seed=1)
    volume = io.read_volume(tmp_path)
    reference, _, _ = read_with_simpleitk(tmp_path)
    assert volume.data.min() < 0
    np.testing.assert_allclose(volume.data, expected, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(volume.data, reference, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("signed", [False, True])
def test_dicom_round_trip(tmp_path, signed):
    write_synthetic_series(tmp_path / "in", signed=signed)
    source = io.read_volume(tmp_path / "in")
    data = source.data.copy()
    data[2] = 0.0  # an all-zero slice must survive too
    source = source.replace(data=data)
    files = io.write_dicom(source, tmp_path / "out", series_description="round trip")

    assert [f.parent for f in files] == [tmp_path / "out"] * SLICES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary left
    again = io.read_volume(tmp_path / "out")
    reference, image, _ = read_with_simpleitk(tmp_path / "out")
    # One quantisation step per slice is max|x| / 32767 (signed) or max / 65535 (unsigned).
    step = np.abs(data).reshape(SLICES, -1).max(axis=1) / (32767 if signed else 65535)
    tolerance = step[:, None, None] / 2 + 1e-6 * np.abs(data)
    assert np.all(np.abs(again.data - data) <= tolerance)
    assert np.all(np.abs(reference - data) <= tolerance)
    assert np.all(again.data[2] == 0)
    np.testing.assert_allclose(again.affine, source.affine, atol=1e-6)
    np.testing.assert_allclose(affine_from_simpleitk(image), source.affine, atol=1e-6)
    assert again.units == "BQML" and again.patient_id == "P001"

    written, original = again.headers[0], source.headers[0]
    assert written.SeriesInstanceUID != original.SeriesInstanceUID
    assert written.StudyInstanceUID == original.StudyInstanceUID
    assert written.FrameOfReferenceUID == original.FrameOfReferenceUID
    assert written.SOPClassUID == PositronEmissionTomographyImageStorage
    assert list(written.ImageType) == ["DERIVED", "PRIMARY"]
    assert written.SeriesDescription == "round trip" and written.Modality == "PT"
    assert written.PixelRepresentation == int(signed)
    assert len({h.SOPInstanceUID for h in again.headers}) == SLICES
    assert not {h.SOPInstanceUID for h in again.headers} & {
        h.SOPInstanceUID for h in source.headers
    }


def test_resized_write_keeps_field_of_view(tmp_path):
    write_synthetic_series(tmp_path / "in")
    source = io.read_volume(tmp_path / "in")
    # A super-resolved grid of a different size per axis, made the way enhancement does:
    # new data, the source's affine and headers kept.
    rows, columns = 2 * ROWS, 3 * COLUMNS // 2
    finer = np.random.default_rng(8).gamma(2.0, 1000.0, size=(SLICES, rows, columns))
    io.write_dicom(source.replace(data=finer), tmp_path / "out")
    _, image, _ = read_with_simpleitk(tmp_path / "out")

    new_spacing = np.array(image.GetSpacing())
    np.testing.assert_allclose(
        new_spacing,
        [PIXEL_SPACING[1] * COLUMNS / columns, PIXEL_SPACING[0] * ROWS / rows, SLICE_SPACING],
        rtol=1e-6,
    )

    # The outer edge of the first pixel (centre minus half a pixel along each in-plane axis)
    # stays where it was: same field of view, first pixel centre moved.
    def first_pixel_corner(origin, column_spacing, row_spacing):
        return (
            np.asarray(origin)
            - ROW_DIRECTION * column_spacing / 2
            - COLUMN_DIRECTION * row_spacing / 2
        )

    np.testing.assert_allclose(
        first_pixel_corner(image.GetOrigin(), new_spacing[0], new_spacing[1]),
        first_pixel_corner(ORIGIN, PIXEL_SPACING[1], PIXEL_SPACING[0]),
        atol=1e-6,
    )
    assert not np.allclose(image.GetOrigin(), ORIGIN)
    # The NIfTI writer places the same grid at the same place.
    io.write_nifti(source.replace(data=finer), tmp_path / "finer.nii.gz")
    nifti_image = sitk.ReadImage(str(tmp_path / "finer.nii.gz"))
    np.testing.assert_allclose(
        affine_from_simpleitk(nifti_image), affine_from_simpleitk(image), atol=1e-4
    )
    again = io.read_volume(tmp_path / "out")
    assert again.shape == (SLICES, rows, columns)
    step = finer.reshape(SLICES, -1).max(axis=1) / 65535
    assert np.all(np.abs(again.data - finer) <= step[:, None, None] / 2 + 1e-6 * finer)


def bare_volume() -> Volume:
    rng = np.random.default_rng(3)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([1.25, 1.5, 3.0])
    affine[:3, 3] = [-20.0, -24.0, 10.0]
    return Volume(
        data=rng.gamma(2.0, 1000.0, size=(SLICES, ROWS, COLUMNS)),
        spacing=(3.0, 1.5, 1.25),
        units="BQML",
        affine=affine,
    )


def test_write_without_source_headers(tmp_path):
    volume = bare_volume()
    io.write_dicom(volume, tmp_path / "out")
    reference, image, _ = read_with_simpleitk(tmp_path / "out")
    step = volume.data.reshape(SLICES, -1).max(axis=1) / 65535
    assert np.all(np.abs(reference - volume.data) <= step[:, None, None] / 2 + 1e-3)
    np.testing.assert_allclose(affine_from_simpleitk(image), volume.affine, atol=1e-6)
    again = io.read_volume(tmp_path / "out")
    assert again.units == "BQML" and again.patient_id == "anonymous"
    assert again.spacing == pytest.approx(volume.spacing)


def write_test_nifti(
    path: Path, shape=(COLUMNS, ROWS, SLICES), seed=4
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    voxels = rng.gamma(2.0, 500.0, size=shape).astype(np.float32)
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.2, 1.7, 2.9])
    affine[:3, 3] = [10.0, -5.0, 33.0]
    nib.save(nib.Nifti1Image(voxels, affine), str(path))
    return voxels, affine


def test_nifti_read_matches_simpleitk_and_round_trips(tmp_path):
    voxels, affine = write_test_nifti(tmp_path / "pet.nii.gz")
    volume = io.read_volume(tmp_path / "pet.nii.gz")

    image = sitk.ReadImage(str(tmp_path / "pet.nii.gz"))
    np.testing.assert_array_equal(volume.data, sitk.GetArrayFromImage(image))
    np.testing.assert_array_equal(volume.data, voxels.transpose(2, 1, 0))
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)
    # ITK reports NIfTI geometry in LPS.
    np.testing.assert_allclose(
        np.diag([-1, -1, 1, 1]) @ volume.affine, affine_from_simpleitk(image), atol=1e-4
    )
    assert volume.space == "RAS" and volume.patient_id == "pet"

    out = io.write_nifti(volume, tmp_path / "copy.nii.gz")
    copy = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(copy.dataobj), voxels)
    np.testing.assert_allclose(copy.affine, affine, atol=1e-6)
    assert io.read_volume(out).units == "unknown"


@pytest.mark.parametrize("handedness", [1.0, -1.0], ids=["right-handed", "left-handed"])
def test_nifti_to_dicom_keeps_world_geometry(tmp_path, handedness):
    write_test_nifti(tmp_path / "pet.nii")
    image = nib.load(str(tmp_path / "pet.nii"))
    affine = image.affine @ np.diag([1.0, 1.0, handedness, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), str(tmp_path / "tilted.nii"))
    nifti = io.read_volume(tmp_path / "tilted.nii")
    io.write_dicom(nifti, tmp_path / "out")
    dicom = io.read_volume(tmp_path / "out")
    reference, dicom_image, _ = read_with_simpleitk(tmp_path / "out")

    # DICOM orders slices along row x column cosines; a left-handed NIfTI grid comes back with
    # its slice axis reversed, every voxel still at the same place in the patient.
    expected_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ nifti.affine
    expected_data = nifti.data
    if np.linalg.det(nifti.affine[:3, :3]) < 0:
        expected_affine[:3, 3] += (len(nifti.data) - 1) * expected_affine[:3, 2]
        expected_affine[:3, 2] *= -1
        expected_data = expected_data[::-1]
    np.testing.assert_allclose(dicom.affine, expected_affine, atol=1e-4)
    np.testing.assert_allclose(affine_from_simpleitk(dicom_image), expected_affine, atol=1e-4)
    step = expected_data.reshape(len(expected_data), -1).max(axis=1) / 65535
    assert np.all(np.abs(dicom.data - expected_data) <= step[:, None, None] / 2 + 1e-3)
    assert np.all(np.abs(reference - expected_data) <= step[:, None, None] / 2 + 1e-3)


def test_dicom_to_nifti_keeps_world_geometry_and_masks_line_up(tmp_path):
    write_synthetic_series(tmp_path / "in")
    volume = io.read_volume(tmp_path / "in")
    mask = (volume.data > np.median(volume.data)).astype(np.uint8)
    io.write_nifti(volume, tmp_path / "pet.nii")
    io.write_nifti(volume.replace(data=mask, units="unknown"), tmp_path / "mask.nii.gz")

    pet = io.read_volume(tmp_path / "pet.nii")
    mask_array, mask_affine = io.read_nifti_array(tmp_path / "mask.nii.gz")
    np.testing.assert_array_equal(pet.data, volume.data)
    np.testing.assert_array_equal(mask_array, mask)
    np.testing.assert_allclose(mask_affine, pet.affine)
    assert pet.units == "BQML"
    # ITK reads the NIfTI into the same LPS geometry as the DICOM series.
    image = sitk.ReadImage(str(tmp_path / "pet.nii"))
    np.testing.assert_allclose(affine_from_simpleitk(image), volume.affine, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.data)
    # Integer label maps written by other tools keep their dtype and the same indexing.
    labels = mask.transpose(2, 1, 0) * np.uint8(3)
    nib.save(
        nib.Nifti1Image(labels, nib.load(str(tmp_path / "pet.nii")).affine), tmp_path / "l.nii"
    )
    label_array, _ = io.read_nifti_array(tmp_path / "l.nii")
    assert label_array.dtype == np.uint8
    np.testing.assert_array_equal(label_array, mask * 3)


def test_list_series_and_choosing_one(tmp_path):
    first = write_synthetic_series(tmp_path, description="first", seed=5)
    write_synthetic_series(tmp_path / "more", description="second", seed=6, series_uid="1.2.3.4")
    infos = io.list_series(tmp_path)
    assert sorted((i.description, i.n_files, i.modality) for i in infos) == [
        ("first", SLICES, "PT"),
        ("second", SLICES, "PT"),
    ]
    with pytest.raises(io.ScanError) as error:
        io.read_volume(tmp_path)
    message = str(error.value)
    assert "series_uid=" in message and str(tmp_path) in message
    for info in infos:
        assert info.uid in message and info.description in message
    assert message.count(f"{SLICES} files") == 2
    uid = next(i.uid for i in infos if i.description == "first")
    np.testing.assert_allclose(io.read_volume(tmp_path, series_uid=uid).data, first, rtol=1e-6)
    with pytest.raises(io.ScanError, match="no series with series_uid"):
        io.read_volume(tmp_path, series_uid="9.9.9")


def test_non_dicom_files_are_ignored_with_a_warning(tmp_path):
    expected = write_synthetic_series(tmp_path)
    (tmp_path / "notes.txt").write_text("reconstruction parameters")
    (tmp_path / "sub0" / "thumbnail.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.warns(UserWarning, match=r"ignored 2 file\(s\).*notes\.txt") as record:
        volume = io.read_volume(tmp_path)
    assert "thumbnail.png" in str(record[0].message)
    np.testing.assert_allclose(volume.data, expected, rtol=1e-6)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("nothing here")
    with pytest.warns(UserWarning), pytest.raises(io.ScanError, match="no DICOM image files"):
        io.read_volume(tmp_path / "text")
    (tmp_path / "empty").mkdir()
    with pytest.raises(io.ScanError, match=f"{tmp_path / 'empty'}: no DICOM image files"):
        io.read_volume(tmp_path / "empty")


def test_folder_without_pet_series(tmp_path):
    write_synthetic_series(tmp_path, modality="CT", description="ct")
    with pytest.raises(io.ScanError, match=r"no PET series.*\n.*ct.*modality=CT"):
        io.read_volume(tmp_path)


def test_pet_series_chosen_beside_other_modalities(tmp_path):
    expected = write_synthetic_series(tmp_path / "pet", seed=7)
    write_synthetic_series(tmp_path / "ct", modality="CT", description="ct")
    with pytest.warns(UserWarning, match="ignored the other series"):
        volume = io.read_volume(tmp_path)
    np.testing.assert_allclose(volume.data, expected, rtol=1e-6)


def _other_slice_size(ds: Dataset) -> None:
    ds.Columns = COLUMNS + 2
    ds.PixelData = np.zeros((ROWS, COLUMNS + 2), np.uint16).tobytes()


def _other_pixel_spacing(ds: Dataset) -> None:
    ds.PixelSpacing = [2.0, 1.6]


def _no_pixel_data(ds: Dataset) -> None:
    del ds.PixelData


def _no_position(ds: Dataset) -> None:
    del ds.ImagePositionPatient


def _first_position(ds: Dataset) -> None:
    ds.ImagePositionPatient = list(ORIGIN)


def _one_slice_further(ds: Dataset) -> None:
    ds.ImagePositionPatient = list(ORIGIN + SLICES * SLICE_SPACING * NORMAL)


def _zero_pixel_spacing(ds: Dataset) -> None:
    ds.PixelSpacing = [0.0, 0.0]


def _squashed_orientation(ds: Dataset) -> None:
    ds.ImageOrientationPatient = [*ROW_DIRECTION, *(ROW_DIRECTION * 0.5)]


@pytest.mark.parametrize(
    ("target", "change", "pattern"),
    [
        (3, _other_slice_size, "slice size 32x42 differs from 32x40"),
        (3, _other_pixel_spacing, r"PixelSpacing \[2.0, 1.6\] differs from \[2.0, 1.5\]"),
        (3, _no_pixel_data, "no pixel data"),
        (4, _no_position, "ImagePositionPatient must hold 3 numbers"),
        (4, _first_position, "same position"),
        (SLICES - 1, _one_slice_further, "not evenly spaced"),
        (2, _zero_pixel_spacing, r"PixelSpacing \[0.0, 0.0\] must be two positive sizes"),
        (2, _squashed_orientation, "not two perpendicular unit vectors"),
    ],
)
def test_inconsistent_series_is_refused(tmp_path, target, change, pattern):
    def edit(k, ds):
        if k == target:
            change(ds)
            ds.ImageComments = "edited"

    write_synthetic_series(tmp_path, edit=edit)
    edited = [
        p
        for p in tmp_path.rglob("img*")
        if pydicom.dcmread(p, stop_before_pixels=True).get("ImageComments") == "edited"
    ]
    with pytest.raises(io.ScanError, match=pattern) as error:
        io.read_volume(tmp_path)
    assert len(edited) == 1 and str(edited[0]) in str(error.value)


@pytest.mark.parametrize("keep_bytes", [700, -100], ids=["cut-in-header", "cut-in-pixels"])
def test_truncated_file_is_named(tmp_path, keep_bytes):
    write_synthetic_series(tmp_path)
    victim = sorted(tmp_path.rglob("img*"))[2]
    victim.write_bytes(victim.read_bytes()[:keep_bytes])
    with pytest.raises(io.ScanError, match="truncated") as error:
        io.read_volume(tmp_path)
    assert str(victim) in str(error.value)


def test_bad_nifti_inputs(tmp_path):
    affine = np.eye(4)
    with_nan = np.ones((4, 5, 3), np.float32)
    with_nan[1, 2, 0] = np.nan
    nib.save(nib.Nifti1Image(with_nan, affine), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(
        io.ScanError, match=r"nan\.nii\.gz: 1 voxels are NaN or infinite, in slices 0$"
    ):
        io.read_volume(tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 5, 3, 2), np.float32), affine), str(tmp_path / "dyn.nii"))
    with pytest.raises(io.ScanError, match=r"dyn\.nii: a 4D image"):
        io.read_volume(tmp_path / "dyn.nii")
    nib.save(nib.Nifti1Image(np.ones((4, 5, 3, 1), np.float32), affine), str(tmp_path / "one.nii"))
    assert io.read_volume(tmp_path / "one.nii").shape == (3, 5, 4)
    with pytest.raises(io.ScanError, match="no such file"):
        io.read_volume(tmp_path / "missing.nii")


# Fluorine-18: after exactly one half-life the injected dose has halved.
WEIGHT_KG, DOSE_BQ, HALF_LIFE_S = 70.0, 3.7e8, 6586.2
INJECTION = datetime.datetime(2024, 3, 1, 9, 58, 0)


def _suv_header(decay_correction="START", drop=None):
    def edit(k, ds):
        ds.PatientWeight = WEIGHT_KG
        ds.DecayCorrection = decay_correction
        scan = INJECTION + datetime.timedelta(seconds=HALF_LIFE_S)
        ds.SeriesDate = scan.strftime("%Y%m%d")
        ds.SeriesTime = scan.strftime("%H%M%S.%f")
        ds.AcquisitionDate = ds.SeriesDate
        ds.AcquisitionTime = (scan + datetime.timedelta(seconds=5 * k)).strftime("%H%M%S.%f")
        isotope = Dataset()
        isotope.RadionuclideTotalDose = DOSE_BQ
        isotope.RadionuclideHalfLife = HALF_LIFE_S
        isotope.RadiopharmaceuticalStartTime = INJECTION.strftime("%H%M%S")
        ds.RadiopharmaceuticalInformationSequence = [isotope]
        if drop == "PatientWeight":
            del ds.PatientWeight
        elif drop is not None:
            delattr(isotope, drop)

    return edit


def test_suv_after_one_half_life(tmp_path):
    bqml = write_synthetic_series(tmp_path, edit=_suv_header("START"))
    expected_factor = WEIGHT_KG * 1000 / (DOSE_BQ / 2)
    assert io.read_volume(tmp_path).meta["suv_factor"] == pytest.approx(expected_factor, rel=1e-9)
    suv = io.read_volume(tmp_path, units="SUVbw")
    assert suv.units == "SUVbw"
    np.testing.assert_allclose(suv.data, bqml * expected_factor, rtol=1e-6)

    # Written as SUV (Units GML), read back as SUV; written as Bq/mL, converted again.
    io.write_dicom(suv, tmp_path.parent / "suv_out")
    again = io.read_volume(tmp_path.parent / "suv_out")
    assert again.units == "SUVbw" and again.headers[0].Units == "GML"
    np.testing.assert_allclose(again.data, suv.data, rtol=1e-4, atol=1e-4 * suv.data.max())
    io.write_dicom(io.read_volume(tmp_path), tmp_path.parent / "bqml_out")
    converted = io.read_volume(tmp_path.parent / "bqml_out", units="SUVbw")
    np.testing.assert_allclose(converted.data, suv.data, rtol=1e-4, atol=1e-4 * suv.data.max())


def test_suv_decay_corrected_to_administration(tmp_path):
    bqml = write_synthetic_series(tmp_path, edit=_suv_header("ADMIN"))
    suv = io.read_volume(tmp_path, units="SUVbw")
    np.testing.assert_allclose(suv.data, bqml * WEIGHT_KG * 1000 / DOSE_BQ, rtol=1e-6)


@pytest.mark.parametrize(
    "missing", ["PatientWeight", "RadionuclideTotalDose", "RadionuclideHalfLife"]
)
def test_suv_names_the_missing_attribute(tmp_path, missing):
    write_synthetic_series(tmp_path, edit=_suv_header("START", drop=missing))
    volume = io.read_volume(tmp_path)
    assert "suv_factor" not in volume.meta
    with pytest.raises(io.ScanError, match=f"SUVbw needs {missing}"):
        io.read_volume(tmp_path, units="SUVbw")


@pytest.mark.filterwarnings("ignore:Invalid value for VR TM")  # pydicom notices it too
def test_suv_names_a_malformed_time(tmp_path):
    def edit(k, ds):
        _suv_header("START")(k, ds)
        ds.SeriesTime = "256000"

    write_synthetic_series(tmp_path, edit=edit)
    assert "suv_factor" not in io.read_volume(tmp_path).meta
    with pytest.raises(io.ScanError, match="SeriesTime .256000. is not a valid DICOM"):
        io.read_volume(tmp_path, units="SUVbw")


def test_suv_without_dicom_header_or_with_bad_request(tmp_path):
    write_test_nifti(tmp_path / "pet.nii")
    with pytest.raises(io.ScanError, match="no DICOM header"):
        io.read_volume(tmp_path / "pet.nii", units="SUVbw")
    with pytest.raises(io.ScanError, match="units must be None"):
        io.read_volume(tmp_path / "pet.nii", units="kBq")


def test_writer_refuses_to_overwrite_or_write_into_the_input(tmp_path):
    write_synthetic_series(tmp_path / "in")
    volume = io.read_volume(tmp_path / "in")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user data")
    with pytest.raises(io.ScanError, match="not an empty folder"):
        io.write_dicom(volume, tmp_path / "busy")
    with pytest.raises(io.ScanError, match="refusing to write into the input"):
        io.write_dicom(volume, tmp_path / "in" / "enhanced")
    with pytest.raises(io.ScanError, match="NaN"):
        io.write_dicom(volume.replace(data=np.full(volume.shape, np.nan)), tmp_path / "nan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "in"]
    assert (tmp_path / "busy" / "keep.txt").read_text() == "user data"
    (tmp_path / "empty").mkdir()
    io.write_dicom(volume, tmp_path / "empty")
    assert len(list((tmp_path / "empty").iterdir())) == SLICES


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    volume = bare_volume()
    save_as = Dataset.save_as
    written = []

    def save_then_fail(dataset, filename, **kwargs):
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        written.append(filename)
        save_as(dataset, filename, **kwargs)

    monkeypatch.setattr(Dataset, "save_as", save_then_fail)
    with pytest.raises(io.ScanError, match="No space left.*nothing written"):
        io.write_dicom(volume, tmp_path / "out")
    assert len(written) == 3 and list(tmp_path.iterdir()) == []
    with pytest.raises(io.ScanError, match="refusing to write into the input"):
        io.write_nifti(
            volume.replace(meta={"source_path": str(tmp_path / "a.nii")}), tmp_path / "a.nii"
        )


def test_write_nifti_refuses_an_existing_file_unless_told_to_overwrite(tmp_path):
    volume = bare_volume()
    path = tmp_path / "out.nii.gz"
    io.write_nifti(volume, path)
    before = path.read_bytes()
    doubled = volume.replace(data=volume.data * 2)
    with pytest.raises(io.ScanError, match=r"out\.nii\.gz: already exists; nothing written"):
        io.write_nifti(doubled, path)
    assert path.read_bytes() == before
    io.write_nifti(doubled, path, overwrite=True)
    np.testing.assert_allclose(io.read_volume(path).data, doubled.data, rtol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def _nifti_with_sform(path: Path, sform: np.ndarray) -> None:
    """A NIfTI whose only geometry is `sform` (qform unset), as a damaged header can be."""
    header = nib.Nifti1Header()
    header.set_data_shape((COLUMNS, ROWS, SLICES))
    header.set_data_dtype(np.float32)
    header["srow_x"], header["srow_y"], header["srow_z"] = sform[:3]
    header["sform_code"], header["qform_code"] = 1, 0
    voxels = np.ones((COLUMNS, ROWS, SLICES), np.float32)
    nib.save(nib.Nifti1Image(voxels, None, header), str(path))  # no affine: the header's stays


@pytest.mark.parametrize(
    ("sform", "pattern"),
    [
        (np.zeros((4, 4)), r"voxel sizes 0 x 0 x 0 mm; every size must be positive"),
        (np.array([[2.0, 2.0, 0, 0], [0, 0, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1]]), "singular"),
        (np.diag([2.0, np.nan, 3.0, 1.0]), "NaN or infinite"),
    ],
    ids=["all-zero", "parallel-axes", "nan"],
)
def test_a_nifti_with_a_degenerate_affine_is_refused_on_read(tmp_path, sform, pattern):
    path = tmp_path / "damaged.nii.gz"
    _nifti_with_sform(path, sform)
    for read in (io.read_volume, io.read_nifti_array):
        with pytest.raises(io.ScanError, match=pattern) as error:
            read(path)
        assert str(error.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    "volume",
    [
        bare_volume().replace(affine=np.zeros((4, 4))),
        Volume(np.ones((SLICES, ROWS, COLUMNS)), spacing=(0.0, 1.5, 1.25), units="BQML"),
    ],
    ids=["zero-affine", "zero-spacing"],
)
def test_every_writer_refuses_a_degenerate_grid_in_one_line(tmp_path, volume):
    writes = [
        lambda: io.write_nifti(volume, tmp_path / "out.nii.gz"),
        lambda: io.write_dicom(volume, tmp_path / "out"),
        lambda: io.write_outputs(
            volume, dicom_dir=tmp_path / "both", nifti_path=tmp_path / "both.nii.gz"
        ),
    ]
    for write in writes:
        with pytest.raises(io.ScanError, match="voxel sizes .* must be positive.*nothing written"):
            write()
    assert list(tmp_path.iterdir()) == []


def _tilted_positions(k: int, ds: Dataset) -> None:
    """Slices stepping along the normal and sideways, the orientation left axial-like."""
    sideways = SLICE_SPACING * np.tan(np.deg2rad(20.0)) * ROW_DIRECTION
    ds.ImagePositionPatient = [float(v) for v in ORIGIN + k * (SLICE_SPACING * NORMAL + sideways)]


def test_a_tilted_gantry_series_is_refused_with_its_tilt(tmp_path):
    write_synthetic_series(tmp_path, edit=_tilted_positions)
    with pytest.raises(io.ScanError, match=r"tilted-gantry series \(20 degrees\)"):
        io.read_volume(tmp_path)


def test_a_sheared_grid_is_written_to_nifti_exactly_and_refused_by_dicom(tmp_path):
    volume = bare_volume()
    sheared = volume.affine.copy()
    sheared[:3, 2] += [0.0, 3.0 * np.tan(np.deg2rad(20.0)), 0.0]  # slices step sideways
    volume = volume.replace(affine=sheared, space="RAS")
    io.write_nifti(volume, tmp_path / "sheared.nii.gz")
    header = nib.load(str(tmp_path / "sheared.nii.gz")).header
    # The qform cannot hold a shear: unset rather than contradicting the sform.
    assert int(header["qform_code"]) == 0 and int(header["sform_code"]) == 1
    np.testing.assert_allclose(header.get_sform(), sheared, atol=1e-5)
    np.testing.assert_allclose(
        io.read_volume(tmp_path / "sheared.nii.gz").affine, sheared, atol=1e-5
    )
    with pytest.raises(io.ScanError, match="not stacked perpendicular .* nothing written"):
        io.write_dicom(volume, tmp_path / "sheared")
    assert not (tmp_path / "sheared").exists()


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch):
    """A folder nobody may write into.

    A normal user gets a chmod; root ignores file modes, so for root every way the writers
    create something inside the folder fails as the kernel would for a user (EACCES).
    """
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return

    def refuse_inside(target):
        if Path(target).parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))

    real_mkdir, real_save = Path.mkdir, nib.save

    def mkdir(path, *args, **kwargs):
        refuse_inside(path)
        return real_mkdir(path, *args, **kwargs)

    def save(image, filename):
        refuse_inside(filename)
        return real_save(image, filename)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(nib, "save", save)
    yield folder


def _fill_the_disk(monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nib, "save", no_space)
    monkeypatch.setattr(Dataset, "save_as", no_space)


def test_write_errors_are_one_line_naming_the_target_and_the_cause(
    tmp_path, read_only_folder, monkeypatch
):
    volume = bare_volume()
    locked = read_only_folder
    with pytest.raises(io.ScanError) as error:
        io.write_nifti(volume, locked / "out.nii.gz")
    assert (
        str(error.value)
        == f"{locked / 'out.nii.gz'}: cannot write the file (Permission denied); nothing written"
    )
    with pytest.raises(
        io.ScanError, match=r"locked/out: cannot write the series \(Permission denied\)"
    ):
        io.write_dicom(volume, locked / "out")
    assert list(locked.iterdir()) == []

    _fill_the_disk(monkeypatch)
    full = tmp_path / "full"
    with pytest.raises(
        io.ScanError,
        match=r"out\.nii: cannot write the file \(No space left on device\); nothing written",
    ):
        io.write_nifti(volume, full / "out.nii")
    with pytest.raises(
        io.ScanError,
        match=r"out: cannot write the series \(No space left on device\); nothing written",
    ):
        io.write_dicom(volume, full / "out")
    assert list(full.iterdir()) == []


def test_leftovers_of_interrupted_writes_are_skipped_by_readers_and_removed_by_writers(tmp_path):
    out = tmp_path / "out"
    write_synthetic_series(out / "patient_a")
    # What kill -9 leaves: a partial series folder and a 0-byte NIfTI under temporary names.
    child = subprocess.Popen(["true"])
    child.wait()
    dead = io.files.temporary_name(out / "patient_b")
    dead = dead.with_name(dead.name.replace(f"-{os.getpid()}-", f"-{child.pid}-"))
    shutil.copytree(out / "patient_a", dead)
    dead_nifti = dead.with_name(dead.name + ".nii.gz")
    dead_nifti.touch()
    running = io.files.temporary_name(out / "patient_c")  # this process: still writing
    shutil.copytree(out / "patient_a", running)
    with pytest.warns(UserWarning, match="skipped 3 leftover") as warned:
        volume = io.read_volume(out)
    assert volume.shape == (SLICES, ROWS, COLUMNS)
    assert all(p.name in str(warned[0].message) for p in (dead, dead_nifti, running))

    with pytest.warns(UserWarning, match="removed 2 leftover"):
        io.write_nifti(bare_volume(), out / "patient_d.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["patient_a", "patient_d.nii.gz", running.name]
    )


@needs_nema
def test_real_series_matches_simpleitk_and_survives_a_round_trip(tmp_path):
    volume = io.read_volume(NEMA_SERIES)
    reference, image, files = read_with_simpleitk(NEMA_SERIES)
    assert volume.shape == reference.shape == (89, 192, 192)
    assert [h.SOPInstanceUID for h in volume.headers] == [
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files
    ]
    np.testing.assert_allclose(volume.affine, affine_from_simpleitk(image), atol=1e-5)
    # The series says MONOCHROME1, which GDCM honours by inverting stored values
    # (s -> 2**BitsStored - 1 - s). For PET the stored value is an activity, not a grey level,
    # so the reader does not invert; undo GDCM's inversion to compare.
    for k, header in enumerate(volume.headers):
        assert header.PhotometricInterpretation == "MONOCHROME1"
        slope, intercept = float(header.RescaleSlope), float(header.RescaleIntercept)
        top = 2 ** int(header.BitsStored) - 1
        np.testing.assert_allclose(
            volume.data[k], top * slope + 2 * intercept - reference[k], rtol=1e-6, atol=1e-3
        )
    assert volume.data.min() == 0.0  # air outside the phantom, not the inverted maximum

    io.write_dicom(volume, tmp_path / "out")
    again = io.read_volume(tmp_path / "out")
    written_reference, written_image, _ = read_with_simpleitk(tmp_path / "out")
    step = volume.data.reshape(len(volume.data), -1).max(axis=1) / 65535
    tolerance = step[:, None, None] / 2 + 1e-6 * volume.data
    assert np.all(np.abs(again.data - volume.data) <= tolerance)
    assert np.all(np.abs(written_reference - volume.data) <= tolerance)
    np.testing.assert_allclose(again.affine, volume.affine, atol=1e-5)
    np.testing.assert_allclose(affine_from_simpleitk(written_image), volume.affine, atol=1e-5)
    assert again.units == volume.units == "unknown"
    assert again.patient_id == volume.patient_id


@needs_dciodvfy
def test_written_series_pass_the_dicom_validator(tmp_path):
    write_synthetic_series(tmp_path / "in", signed=True)
    synthetic = io.write_dicom(io.read_volume(tmp_path / "in"), tmp_path / "synthetic")
    assert_valid_pet_series(synthetic)
    write_test_nifti(tmp_path / "pet.nii.gz")
    from_nifti = io.write_dicom(io.read_volume(tmp_path / "pet.nii.gz"), tmp_path / "nifti")
    assert_valid_pet_series(from_nifti)
    assert_valid_pet_series(io.write_dicom(bare_volume(), tmp_path / "bare"))
    write_synthetic_series(tmp_path / "suv", edit=_suv_header("START"))
    assert_valid_pet_series(
        io.write_dicom(io.read_volume(tmp_path / "suv", units="SUVbw"), tmp_path / "suv_out")
    )


@needs_dciodvfy
@needs_nema
def test_series_written_from_a_real_scan_passes_the_dicom_validator(tmp_path):
    files = io.write_dicom(io.read_volume(NEMA_SERIES), tmp_path / "out")
    assert_valid_pet_series(files)
