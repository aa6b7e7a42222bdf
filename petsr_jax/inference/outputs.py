"""What `launch/enhance.py` decides before any work starts, and what it warns about after.

Which patients an input holds, where each one's outputs go (refusing outputs inside the input,
existing outputs and paths under files), the derived series' number; then the results a user
should stop at: total activity or SUVmax moved beyond what super-resolution does, a model that
reconstructs a scan worse than bicubic.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from petsr_jax import data
from petsr_jax.inference.errors import InferenceError
from petsr_jax.volume import Volume

MODES = ("enhance", "reconstruct")


FORMATS = ("auto", "dicom", "nifti", "both")


# Derived series are numbered after their source, so viewers list them beside it.
_SERIES_NUMBER_OFFSET = 1000


@dataclasses.dataclass(frozen=True)
class EnhanceJob:
    """One patient of an input: where its scan is and the output paths it will get."""

    name: str
    source: Path
    dicom_dir: Path | None
    nifti_path: Path | None

    @property
    def targets(self) -> list[Path]:
        return [p for p in (self.dicom_dir, self.nifti_path) if p is not None]


def _holds_dicom_files(folder: Path) -> bool:
    """Whether DICOM files sit directly in `folder` (a series folder, not a patients root)."""
    from pydicom.misc import is_dicom

    return any(p.is_file() and is_dicom(p) for p in folder.iterdir())


def input_patients(input_path) -> dict[str, Path]:
    """Name → scan path of every scan an input holds.

    A NIfTI file or a folder with DICOM files in it is one scan, named after the file stem or
    the folder; any other folder is a patients root read as `data.list_patients` reads a data
    root (one DICOM folder or NIfTI file per patient; masks/, t1/, labels/, lesions/ skipped).
    """
    path = Path(input_path)
    if not path.exists():
        raise InferenceError(f"{path}: no such file or folder")
    if path.is_file():
        name = path.name
        for ext in (".nii.gz", ".nii"):
            if name.lower().endswith(ext):
                return {name[: -len(ext)]: path}
        raise InferenceError(
            f"{path}: not a NIfTI file (.nii / .nii.gz); for DICOM, give the series folder"
        )
    if _holds_dicom_files(path):
        return {path.resolve().name: path}
    try:
        return data.list_patients(path)
    except data.DataError as error:
        raise InferenceError(str(error)) from None


def plan_outputs(input_path, output_dir, output_format: str = "auto") -> list[EnhanceJob]:
    """The outputs of enhancing `input_path` into `output_dir`, refused before anything is done.

    Per patient: `<output_dir>/<name>/` (a DICOM series) and/or `<output_dir>/<name>.nii.gz`,
    so the output folder is itself a data root. `output_format` "auto" writes each scan in its
    input format. Refused: an output folder inside (or equal to) an input folder, an output that
    would replace an input file, and any patient output that already exists and is not empty.
    """
    if output_format not in FORMATS:
        raise InferenceError(f"format: expected one of {', '.join(FORMATS)}, got {output_format!r}")
    input_path = Path(input_path)
    output_dir = Path(output_dir)
    # A file where the output folder goes fails only at the first write, after the first scan.
    blocker = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is" if blocker == output_dir else f"lies under {blocker}, which is"
        raise InferenceError(
            f"{output_dir}: {where} a file, not a folder; give --output a new or empty folder"
        )
    patients = input_patients(input_path)
    out_resolved = output_dir.resolve()
    in_resolved = input_path.resolve()
    inside = out_resolved == in_resolved or in_resolved in out_resolved.parents
    if in_resolved.is_dir() and inside:
        raise InferenceError(
            f"{output_dir}: is inside the input {input_path}; choose an output folder outside "
            "the input so the source scans are never touched"
        )
    jobs = []
    for name, source in patients.items():
        same_as_input = "nifti" if source.is_file() else "dicom"
        wanted = output_format if output_format != "auto" else same_as_input
        want_dicom = wanted in ("dicom", "both")
        want_nifti = wanted in ("nifti", "both")
        jobs.append(
            EnhanceJob(
                name,
                source,
                output_dir / name if want_dicom else None,
                output_dir / f"{name}.nii.gz" if want_nifti else None,
            )
        )
    sources = {job.source.resolve() for job in jobs}
    problems = []
    for job in jobs:
        for target in job.targets:
            resolved = target.resolve()
            if resolved in sources or any(s in resolved.parents for s in sources if s.is_dir()):
                problems.append(f"{target} would overwrite the input {job.source}")
            elif target.is_dir() and any(target.iterdir()):
                problems.append(f"{target} already exists and is not empty")
            elif target.exists() and not target.is_dir():
                problems.append(f"{target} already exists")
    if problems:
        raise InferenceError(
            "refusing to overwrite; nothing written:\n  - "
            + "\n  - ".join(problems)
            + "\nchoose another --output or remove these first"
        )
    return jobs


def series_number(volume: Volume) -> int | None:
    """The source's SeriesNumber + 1000, so a viewer lists the derived series after it."""
    if not volume.headers:
        return None
    number = volume.headers[0].get("SeriesNumber")
    try:
        return int(number) + _SERIES_NUMBER_OFFSET
    except (TypeError, ValueError):
        return None


# Relative change of an enhanced scan's total activity beyond which it is a warning.
# Super-resolution moves activity between voxels and should create none. Measured on 2026-12-04:
# the README's quick model changes the totals of its own cohort's validation and test scans by
# −2.0 to +3.0 percent (negative undershoot clipped to 0 included), and the NEMA IQ phantom,
# which it was not trained for, by +20.4 percent; 5 percent lies between the two.
TOTAL_ACTIVITY_TOLERANCE = 0.05


# The same for the maximum voxel (SUVmax), one bound each way. Sharpening raises the peaks of
# small hot structures that the scan's blur spread out (partial-volume recovery): the quick model
# raises its cohort scans' maxima by 18 to 34 percent, so more than +50 percent is beyond what it
# does to scans it fits. Sharpening should not lower the hottest voxel: beyond −10 percent the
# model flattens it.
MAX_INCREASE_TOLERANCE = 0.50


MAX_DECREASE_TOLERANCE = 0.10


def activity_warnings(change) -> list[str]:
    """What a user should stop at in a `quantitation.ActivityChange`: the total activity changed
    by more than `TOTAL_ACTIVITY_TOLERANCE`, or the maximum raised by more than
    `MAX_INCREASE_TOLERANCE` or lowered by more than `MAX_DECREASE_TOLERANCE`."""
    problems = []
    total, peak = change.total_change, change.max_change
    if abs(total) > TOTAL_ACTIVITY_TOLERANCE:
        problems.append(
            f"the output's total activity is {_signed(total)} percent against the input's (more "
            f"than {TOTAL_ACTIVITY_TOLERANCE:.0%}); super-resolution should move activity, not "
            "create or remove it: check that the scan fits the model (pixel spacing, resolution, "
            "units) before using the output for quantitation"
        )
    if peak > MAX_INCREASE_TOLERANCE or peak < -MAX_DECREASE_TOLERANCE:
        bound = MAX_INCREASE_TOLERANCE if peak > 0 else MAX_DECREASE_TOLERANCE
        problems.append(
            f"the output's maximum (SUVmax) is {_signed(peak)} percent against the input's (more "
            f"than {bound:.0%} {'up' if peak > 0 else 'down'}); read SUVmax on the input, not on "
            "the output"
        )
    return problems


def _signed(fraction: float) -> str:
    """`+20.4` / `−38.7`: a relative change in percent, with a true minus sign as in
    `ActivityChange.summary`."""
    return f"{fraction * 100:+.1f}".replace("-", "−")


def score_warnings(scores: dict) -> list[str]:
    """A model that reconstructs a scan worse than its bicubic input (PSNR or SSIM, each named)
    is worth a warning: on that scan the network removes more than it restores."""
    below = []
    for metric, unit, digits in (("psnr", " dB", 2), ("ssim", "", 3)):
        model, bicubic = scores.get(f"sr/{metric}"), scores.get(f"bicubic/{metric}")
        if model is not None and bicubic is not None and model < bicubic:
            below.append(
                f"{metric.upper()} {model:.{digits}f}{unit} against {bicubic:.{digits}f}{unit}"
            )
    if not below:
        return []
    return [
        f"the model scores below bicubic ({', '.join(below)}): on this scan it loses more than "
        "it restores; check that the scan fits the model (pixel spacing, resolution, noise) "
        "before using its output"
    ]
