"""NIfTI files (`.nii`, `.nii.gz`) read as a `Volume` or an auxiliary map, and written.

`data[k, j, i] = nifti[i, j, k]`: the file's third voxel axis becomes the slice axis and no
reorientation happens, so `affine` is the file's own (RAS, mm) and `write_nifti(read_volume(f))`
reproduces `f`'s affine and values. `read_nifti_array` uses the same mapping, so masks and labels
stored on the PET grid line up pixel for pixel.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

from petsr_jax.io.errors import ScanError
from petsr_jax.io.files import (
    Staged,
    commit,
    refuse_existing_target,
    refuse_source,
    remove_stale_temporaries,
    staging,
    temporary_name,
)
from petsr_jax.io.geometry import LPS_TO_RAS, grid_affine, grid_problem, is_sheared
from petsr_jax.volume import Volume


def read_nifti_array(path) -> tuple[np.ndarray, np.ndarray]:
    """An auxiliary NIfTI map (mask, T1, labels) as `([slices, H, W] array, affine)`.

    Same axis mapping as `read_volume` gives for NIfTI (`array[k, j, i] = nifti[i, j, k]`), so a
    map stored on the PET grid indexes like the PET `Volume.data`. The stored dtype is kept
    (integer labels stay integers) unless the file has a scaling slope.
    """
    path = Path(path)
    if not path.is_file():
        raise ScanError(f"{path}: no such file")
    if not is_nifti(path):
        raise ScanError(f"{path}: expected a NIfTI file (.nii or .nii.gz)")
    try:
        # No memory map: the caller may overwrite the file while holding the array.
        image = nib.load(str(path), mmap=False)
        voxels = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for broken files
        raise ScanError(f"{path}: cannot be read as NIfTI ({error})") from error
    voxels = _as_three_dimensional(voxels, path)
    if np.issubdtype(voxels.dtype, np.floating) and not np.all(np.isfinite(voxels)):
        bad = ~np.isfinite(voxels)
        slices = np.flatnonzero(bad.any(axis=(0, 1))).tolist()  # NIfTI k = our slice index
        shown = ", ".join(map(str, slices[:10])) + (" ..." if len(slices) > 10 else "")
        raise ScanError(f"{path}: {int(bad.sum())} voxels are NaN or infinite, in slices {shown}")
    affine = np.asarray(image.affine, np.float64)
    if problem := grid_problem(affine):
        raise ScanError(f"{path}: {problem}; the header's geometry is damaged")
    return np.ascontiguousarray(voxels.transpose(2, 1, 0)), affine


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _nifti_suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"


def _as_three_dimensional(voxels: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing singleton axes (a 3D image saved as 4D with one frame) and refuse the rest."""
    while voxels.ndim > 3 and voxels.shape[-1] == 1:
        voxels = voxels[..., 0]
    if voxels.ndim == 2:
        voxels = voxels[:, :, np.newaxis]
    if voxels.ndim != 3:
        raise ScanError(
            f"{path}: a {voxels.ndim}D image of shape {voxels.shape}; expected one 3D volume "
            "(for a dynamic scan, extract one frame first, e.g. nibabel's img.slicer[..., t])"
        )
    return voxels


def read_nifti_volume(path: Path) -> Volume:
    voxels, affine = read_nifti_array(path)
    header = nib.load(str(path)).header
    description = header["descrip"].tobytes().split(b"\0")[0].decode("ascii", "replace")
    units = "unknown"
    for word in description.split():
        if word.startswith("units="):
            units = word[len("units=") :]
    sform_code = int(header["sform_code"])
    qform_code = int(header["qform_code"])
    voxel_sizes = np.linalg.norm(affine[:3, :3], axis=0)
    stem = path.name[: -len(_nifti_suffix(path))]
    return Volume(
        data=voxels.astype(np.float32),
        spacing=(voxel_sizes[2], voxel_sizes[1], voxel_sizes[0]),
        units=units,
        patient_id=stem,
        affine=affine,
        space="RAS",
        meta={"source_path": str(path), "nifti_codes": (sform_code, qform_code)},
    )


def write_nifti(volume: Volume, path, *, overwrite: bool = False) -> Path:
    """Write `volume` as a float32 NIfTI file (`.nii` or `.nii.gz`) and return its path.

    `nifti[i, j, k] = data[k, j, i]` with the volume's affine (converted from LPS to RAS for
    DICOM sources; a resized grid keeps the source's field of view, as in `write_dicom`), so
    `read_volume` gives back the same array and geometry. Units go into the header's description
    field (`units=BQML`), where `read_volume` finds them again. The file appears complete or not
    at all (temporary name, then rename). An existing file is refused unless `overwrite=True`;
    the volume's own source is refused always.
    """
    path = Path(path)
    commit([stage_nifti(volume, path, overwrite=overwrite)])
    return path


def stage_nifti(volume: Volume, path: Path, *, overwrite: bool = False) -> Staged:
    """Check everything, then write the file under a temporary name for `commit` to rename."""
    if not is_nifti(path):
        raise ScanError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    refuse_source(path, volume)
    if not overwrite:
        refuse_existing_target(path, " (pass overwrite=True to replace it)")
    image = _nifti_image(volume, path)
    temporary = temporary_name(path, _nifti_suffix(path))
    with staging(path, temporary, "file"):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        try:
            nib.save(image, str(temporary))
        except HeaderDataError as error:
            raise ScanError(f"{path}: {error}; nothing written") from error
    return Staged(temporary, path, replace=overwrite)


def _nifti_image(volume: Volume, path: Path) -> nib.Nifti1Image:
    data = np.asarray(volume.data, np.float32)
    if not np.all(np.isfinite(data)):
        raise ScanError(f"{path}: the volume holds NaN or infinite values; nothing written")
    affine = LPS_TO_RAS @ grid_affine(volume)
    if problem := grid_problem(affine):
        raise ScanError(f"{path}: {problem}; nothing written")
    image = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine)
    sform_code, qform_code = volume.meta.get("nifti_codes", (1, 1))
    image.header.set_sform(affine, code=int(sform_code) or 1)
    if is_sheared(affine):
        # A qform is a rotation and zooms; it would silently drop the shear and disagree with
        # the sform. Unset (code 0), the sform is the file's only geometry.
        image.header.set_qform(None, code=0)
    else:
        image.header.set_qform(affine, code=int(qform_code) or 1)
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = f"petsr_jax units={volume.units}"[:79].encode("ascii", "replace")
    return image
