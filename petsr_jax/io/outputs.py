"""Several outputs of one scan (a DICOM series and a NIfTI file) written all or nothing.

A user asking for both formats gets both or neither: a failure of the second (a full disk, a
read-only folder) must not leave the first behind, where it would block the rerun as an
existing output.
"""

from __future__ import annotations

from pathlib import Path

from petsr_jax.io.dicom import stage_dicom
from petsr_jax.io.files import Staged, commit, remove_quietly
from petsr_jax.io.nifti import stage_nifti
from petsr_jax.volume import Volume


def write_outputs(
    volume: Volume,
    *,
    dicom_dir=None,
    nifti_path=None,
    series_description: str = "petsr_jax",
    series_number: int | None = None,
) -> list[Path]:
    """Write `volume` as a DICOM series in `dicom_dir` and/or a NIfTI file at `nifti_path`.

    Each output is written completely under a temporary name first (as `write_dicom` and
    `write_nifti` do); only when all are complete are they renamed, together. Any failure
    leaves none of them and raises one `ScanError` naming the path and the cause.

    Returns:
      The paths written, DICOM folder first.
    """
    staged: list[Staged] = []
    try:
        if dicom_dir is not None:
            staged.append(
                stage_dicom(
                    volume,
                    Path(dicom_dir),
                    series_description=series_description,
                    series_number=series_number,
                )
            )
        if nifti_path is not None:
            staged.append(stage_nifti(volume, Path(nifti_path)))
    except BaseException:
        for item in staged:
            remove_quietly(item.temporary)
        raise
    commit(staged)
    return [item.target for item in staged]
