"""Scan readers and writers (DICOM series, NIfTI): `read_volume`, `write_dicom`, `write_nifti`,
`write_outputs` (both formats of one scan, all or nothing), `resample` (another voxel size, or
another scan's grid).

Everything a user can get wrong about a scan (a folder holding several series, a truncated file,
mixed slice sizes, a 4D NIfTI...) becomes one `ScanError` that names the file and the problem,
before anything is written. Writers never leave half a result and never replace an existing
one: they write under a temporary name beside the target and rename at the end.

One module per concern: `dicom` (series in folders), `nifti` (files), `units` (DICOM units and
SUV), `geometry` (slice order, affines, LPS / RAS, grids refused at the door), `files`
(every write of the project, scans and a run's records alike: temporary names, all-or-nothing
renames, leftovers of interrupted writes), `outputs` (a DICOM series and a NIfTI file of one
scan written together, all or nothing), `resample` (voxel size and grid, geometry kept true),
`errors` (`ScanError`).
Array conventions are in the `dicom` and `nifti` module docstrings; the SUV formula in `units`.
"""

from __future__ import annotations

from pathlib import Path

from petsr_jax.io.dicom import SeriesInfo, list_series, read_dicom_volume, write_dicom
from petsr_jax.io.errors import ScanError
from petsr_jax.io.nifti import is_nifti, read_nifti_array, read_nifti_volume, write_nifti
from petsr_jax.io.outputs import write_outputs
from petsr_jax.io.resample import resample
from petsr_jax.io.units import convert_units
from petsr_jax.volume import Volume

__all__ = [
    "ScanError",
    "SeriesInfo",
    "list_series",
    "read_nifti_array",
    "read_volume",
    "resample",
    "write_dicom",
    "write_nifti",
    "write_outputs",
]


def read_volume(path, *, series_uid: str | None = None, units: str | None = None) -> Volume:
    """Read a DICOM series folder (searched recursively) or a NIfTI file as a `Volume`.

    Args:
      path: a folder holding one PET series (file names do not matter; non-DICOM files are
        ignored with a warning), or a `.nii` / `.nii.gz` file.
      series_uid: the SeriesInstanceUID to read when the folder holds several series (see
        `list_series`).
      units: None keeps the stored units (`"BQML"` for Bq/mL); `"SUVbw"` converts to
        body-weight SUV (formula in the `units` module docstring).

    Raises:
      ScanError: the input cannot be read as one consistent volume, or the unit conversion
        needs an attribute the header lacks.
    """
    path = Path(path)
    if not path.exists():
        raise ScanError(f"{path}: no such file or folder")
    if is_nifti(path):
        volume = read_nifti_volume(path)
    elif path.is_dir():
        volume = read_dicom_volume(path, series_uid)
    else:
        raise ScanError(
            f"{path}: not a NIfTI file (.nii / .nii.gz); to read DICOM, pass the folder that "
            "holds the series"
        )
    return convert_units(volume, units, path)
