"""Scan readers and writers (DICOM series, NIfTI): `read_volume`, `write_dicom`, `write_nifti`.

Everything a user can get wrong about a scan (a folder holding several series, a truncated file,
mixed slice sizes, a 4D NIfTI...) becomes one `ScanError` that names the file and the problem,
before anything is written. Writers never leave half a result: they write under a temporary name
beside the target and rename at the end.

Array conventions (what `Volume.data[k, j, i]` means):

- DICOM: `k` is the slice, ordered by ImagePositionPatient projected on the slice normal
  (row cosines × column cosines of ImageOrientationPatient), never by file name or
  InstanceNumber; `j` is the pixel row, `i` the pixel column. `affine` maps `(i, j, k)` to DICOM
  patient space (LPS, mm); the slice spacing comes from the positions, not SliceThickness.
- NIfTI: `data[k, j, i] = nifti[i, j, k]`, i.e. the file's third voxel axis becomes the slice
  axis and no reorientation happens, so `affine` is the file's own (RAS, mm) and
  `write_nifti(read_volume(f))` reproduces `f`'s affine and values. `read_nifti_array` uses the
  same mapping, so masks and labels stored on the PET grid line up pixel for pixel.

Values are in physical units: each DICOM slice gets its own RescaleSlope/RescaleIntercept (PET
stores a different slope on every slice). `read_volume(..., units="SUVbw")` converts Bq/mL to
body-weight SUV:

    SUVbw = C [Bq/mL] × PatientWeight [kg] × 1000 [g/kg] / D [Bq]
    D = RadionuclideTotalDose × 2 ** (-(t_scan - t_injection) / RadionuclideHalfLife)

with `t_injection` = RadiopharmaceuticalStartDateTime (or RadiopharmaceuticalStartTime on the
series date) and `t_scan` = SeriesDate/SeriesTime, or the earliest AcquisitionDate/Time when the
series time is missing or later (some consoles reset it on post-processing). This is the decay
of the dose to the time the images are decay corrected to, so it applies when DecayCorrection is
START; with ADMIN the images are already corrected to the injection time and `D` is the injected
dose itself. The factor `PatientWeight × 1000 / D` is kept in `Volume.meta["suv_factor"]`
whenever the header allows it.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import datetime
import os
import shutil
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)
from pydicom.valuerep import DA, DT, TM, format_number_as_ds

from petsr_jax.volume import Volume

__all__ = [
    "ScanError",
    "SeriesInfo",
    "list_series",
    "read_nifti_array",
    "read_volume",
    "write_dicom",
    "write_nifti",
]

# DICOM LPS <-> NIfTI RAS: both are right-handed patient frames that differ by the sign of x, y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Defined terms of PET Units (0054,1001); anything else cannot be written to a valid PET series.
_DICOM_UNITS = frozenset(
    "CNTS NONE CM2 CM2ML PCNT CPS BQML MGMINML UMOLMINML MLMGM MLG 1CM UMOLML PROPCNTS PROPCPS "
    "MLMINML MLML GML STDDEV".split()
)

# Relative tolerance on slice-position steps: a missing slice doubles a step, float noise in
# scanner headers stays far below 1 %.
_SLICE_STEP_TOLERANCE = 0.01

_MAX_NAMES_IN_MESSAGE = 10

# PET Image, Enhanced PET Image and Legacy Converted Enhanced PET Image Storage.
_PET_STORAGE = frozenset(
    {
        str(PositronEmissionTomographyImageStorage),
        "1.2.840.10008.5.1.4.1.1.130",
        "1.2.840.10008.5.1.4.1.1.128.1",
    }
)


class ScanError(ValueError):
    """A scan that cannot be read or written as asked; the message names the file and why."""


@dataclasses.dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in a folder, enough for a user to choose it by `uid`."""

    uid: str
    description: str
    modality: str
    n_files: int
    files: tuple[Path, ...] = dataclasses.field(repr=False, default=())


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_volume(path, *, series_uid: str | None = None, units: str | None = None) -> Volume:
    """Read a DICOM series folder (searched recursively) or a NIfTI file as a `Volume`.

    Args:
      path: a folder holding one PET series (file names do not matter; non-DICOM files are
        ignored with a warning), or a `.nii` / `.nii.gz` file.
      series_uid: the SeriesInstanceUID to read when the folder holds several series (see
        `list_series`).
      units: None keeps the stored units (`"BQML"` for Bq/mL); `"SUVbw"` converts to
        body-weight SUV (formula in the module docstring).

    Raises:
      ScanError: the input cannot be read as one consistent volume, or the unit conversion
        needs an attribute the header lacks.
    """
    path = Path(path)
    if not path.exists():
        raise ScanError(f"{path}: no such file or folder")
    if _is_nifti(path):
        volume = _read_nifti_volume(path)
    elif path.is_dir():
        volume = _read_dicom_volume(path, series_uid)
    else:
        raise ScanError(
            f"{path}: not a NIfTI file (.nii / .nii.gz); to read DICOM, pass the folder that "
            "holds the series"
        )
    return _convert_units(volume, units, path)


def read_nifti_array(path) -> tuple[np.ndarray, np.ndarray]:
    """An auxiliary NIfTI map (mask, T1, labels) as `([slices, H, W] array, affine)`.

    Same axis mapping as `read_volume` gives for NIfTI (`array[k, j, i] = nifti[i, j, k]`), so a
    map stored on the PET grid indexes like the PET `Volume.data`. The stored dtype is kept
    (integer labels stay integers) unless the file has a scaling slope.
    """
    path = Path(path)
    if not path.is_file():
        raise ScanError(f"{path}: no such file")
    if not _is_nifti(path):
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
    return np.ascontiguousarray(voxels.transpose(2, 1, 0)), np.asarray(image.affine, np.float64)


def list_series(folder) -> list[SeriesInfo]:
    """Every DICOM series under `folder` (recursive), so a user can pick one by uid."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ScanError(f"{folder}: not a folder")
    series, _ = _scan_folder(folder)
    return sorted(
        (_series_info(uid, members) for uid, members in series.items()),
        key=lambda info: (info.modality, info.description, info.uid),
    )


def _is_nifti(path: Path) -> bool:
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


def _read_nifti_volume(path: Path) -> Volume:
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


def _read_header(path: Path) -> Dataset | None:
    """The header of a DICOM file, or None when the file is not DICOM.

    Files without the 128-byte preamble are still DICOM when they start with a group 0002 or 0008
    tag (old scanners write raw datasets); anything else is left alone rather than force-parsed.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        pass
    except Exception as error:
        raise ScanError(
            f"{path}: DICOM file cannot be read, truncated or corrupt ({error})"
        ) from error
    with open(path, "rb") as stream:
        start = stream.read(2)
    if start not in (b"\x02\x00", b"\x08\x00"):
        return None
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return None
    return header if "SOPClassUID" in header else None


def _scan_folder(folder: Path) -> tuple[dict[str, list[tuple[Path, Dataset]]], list[Path]]:
    """DICOM image headers under `folder`, grouped by SeriesInstanceUID, and the files ignored."""
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    ignored: list[Path] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        header = _read_header(path)
        if header is None or "SeriesInstanceUID" not in header:
            # pydicom reads a file cut inside its header without complaint; the file meta
            # (written first) still tells a truncated PET slice from a DICOMDIR.
            if header is not None and _sop_class(header) in _PET_STORAGE:
                raise ScanError(
                    f"{path}: PET image file without SeriesInstanceUID; the file is truncated "
                    "or its header incomplete"
                )
            ignored.append(path)
            continue
        series.setdefault(str(header.SeriesInstanceUID), []).append((path, header))
    if ignored:
        names = ", ".join(str(p.relative_to(folder)) for p in ignored[:_MAX_NAMES_IN_MESSAGE])
        more = len(ignored) - _MAX_NAMES_IN_MESSAGE
        warnings.warn(
            f"{folder}: ignored {len(ignored)} file(s) that are not DICOM images: {names}"
            + (f" and {more} more" if more > 0 else ""),
            stacklevel=3,
        )
    return series, ignored


def _sop_class(header: Dataset) -> str:
    meta = getattr(header, "file_meta", None) or Dataset()
    return str(header.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")


def _series_info(uid: str, members: list[tuple[Path, Dataset]]) -> SeriesInfo:
    first = members[0][1]
    return SeriesInfo(
        uid=uid,
        description=str(first.get("SeriesDescription", "")),
        modality=str(first.get("Modality", "")),
        n_files=len(members),
        files=tuple(p for p, _ in members),
    )


def _series_table(infos: Sequence[SeriesInfo]) -> str:
    return "\n".join(
        f"  series_uid={i.uid!r}  description={i.description!r}  modality={i.modality}  "
        f"{i.n_files} files"
        for i in infos
    )


def _choose_series(folder: Path, series_uid: str | None) -> list[tuple[Path, Dataset]]:
    series, ignored = _scan_folder(folder)
    if not series:
        raise ScanError(
            f"{folder}: no DICOM image files found"
            + (f" ({len(ignored)} other files ignored)" if ignored else "")
        )
    infos = sorted(
        (_series_info(uid, members) for uid, members in series.items()),
        key=lambda info: (info.modality, info.description, info.uid),
    )
    if series_uid is not None:
        if series_uid not in series:
            raise ScanError(
                f"{folder}: no series with series_uid={series_uid!r}; the folder holds:\n"
                + _series_table(infos)
            )
        chosen = _series_info(series_uid, series[series_uid])
        if chosen.modality != "PT":
            raise ScanError(
                f"{folder}: series {series_uid} has Modality {chosen.modality!r}; expected a "
                "PET series (Modality PT)"
            )
        return series[series_uid]
    pet = [info for info in infos if info.modality == "PT"]
    if not pet:
        raise ScanError(
            f"{folder}: no PET series (Modality PT); the folder holds:\n" + _series_table(infos)
        )
    if len(pet) > 1:
        raise ScanError(
            f"{folder}: holds {len(pet)} PET series; pass series_uid= to choose one:\n"
            + _series_table(infos)
        )
    if len(infos) > 1:
        warnings.warn(
            f"{folder}: reading the only PET series {pet[0].uid}; ignored the other series:\n"
            + _series_table([info for info in infos if info.modality != "PT"]),
            stacklevel=3,
        )
    return series[pet[0].uid]


def _floats(header: Dataset, keyword: str, path, count: int) -> np.ndarray:
    """A required multi-valued numeric attribute, or a ScanError naming the file and field."""
    value = header.get(keyword)
    try:
        numbers = np.asarray([float(v) for v in value], np.float64)
    except (TypeError, ValueError):
        numbers = np.empty(0)
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise ScanError(f"{path}: {keyword} must hold {count} numbers, found {value!r}")
    return numbers


def _most_common(values: list):
    keys = [tuple(np.round(v, 4)) if isinstance(v, np.ndarray) else v for v in values]
    return values[keys.index(collections.Counter(keys).most_common(1)[0][0])]


def _dicom_geometry(
    headers: Sequence[Dataset], names: Sequence
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Slice order, affine `(i, j, k) -> LPS mm` and spacing `(z, y, x)` of one series.

    Raises ScanError when the slices do not form one regular volume: sizes, pixel spacings or
    orientations that differ, repeated positions (e.g. several time frames), missing slices.
    """
    sizes, pixel_spacings, orientations, positions = [], [], [], []
    for header, name in zip(headers, names, strict=True):
        if not header.get("Rows") or not header.get("Columns"):
            raise ScanError(f"{name}: Rows or Columns missing; the file may be truncated")
        sizes.append((int(header.Rows), int(header.Columns)))
        pixel_spacings.append(_floats(header, "PixelSpacing", name, 2))
        orientations.append(_floats(header, "ImageOrientationPatient", name, 6))
        positions.append(_floats(header, "ImagePositionPatient", name, 3))
    # Compare each slice with the most common value, so the message names the odd file out.
    size = _most_common(sizes)
    pixel_spacing = _most_common(pixel_spacings)
    orientation = _most_common(orientations)
    for k, name in enumerate(names):
        if sizes[k] != size:
            raise ScanError(
                f"{name}: slice size {sizes[k][0]}x{sizes[k][1]} differs from "
                f"{size[0]}x{size[1]} of the other slices; one series must have one slice size"
            )
        if not np.allclose(pixel_spacings[k], pixel_spacing, rtol=1e-4, atol=1e-6):
            raise ScanError(
                f"{name}: PixelSpacing {pixel_spacings[k].tolist()} differs from "
                f"{pixel_spacing.tolist()} of the other slices"
            )
        if not np.allclose(orientations[k], orientation, rtol=0, atol=1e-4):
            raise ScanError(
                f"{name}: ImageOrientationPatient {orientations[k].tolist()} differs from "
                f"{orientation.tolist()} of the other slices"
            )
    positions = np.asarray(positions)
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    along_normal = positions @ normal
    order = np.argsort(along_normal, kind="stable")
    positions, along_normal = positions[order], along_normal[order]
    if len(positions) > 1:
        gaps = np.diff(along_normal)
        if np.any(gaps < 1e-6):
            k = int(np.argmin(gaps))
            raise ScanError(
                f"{names[order[k]]} and {names[order[k + 1]]}: two slices at the same position "
                f"{positions[k].tolist()}; the series may hold several time frames or repeated "
                "slices, which a single volume cannot"
            )
        # Each step between neighbours must match the typical one: a missing slice doubles a
        # step, a stray in-plane offset bends the stack.
        steps = np.diff(positions, axis=0)
        typical_step = np.median(steps, axis=0)
        deviation = np.linalg.norm(steps - typical_step, axis=1)
        irregular = np.flatnonzero(
            deviation > _SLICE_STEP_TOLERANCE * np.linalg.norm(typical_step) + 1e-3
        )
        if irregular.size:
            k = int(irregular[0])
            raise ScanError(
                f"{names[order[k]]} and {names[order[k + 1]]}: neighbouring slices are "
                f"{np.linalg.norm(steps[k]):.4g} mm apart where the others are "
                f"{np.linalg.norm(typical_step):.4g} mm apart; slice positions are not evenly "
                "spaced (a slice may be missing)"
            )
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
        slice_spacing = float(step @ normal)
    else:
        slice_spacing = float(
            headers[0].get("SpacingBetweenSlices") or headers[0].get("SliceThickness") or 1.0
        )
        step = normal * slice_spacing
    affine = np.eye(4)
    affine[:3, 0] = row_direction * pixel_spacing[1]
    affine[:3, 1] = column_direction * pixel_spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    return order, affine, (slice_spacing, float(pixel_spacing[0]), float(pixel_spacing[1]))


def _slice_values(path: Path) -> tuple[np.ndarray, Dataset]:
    """Physical values of one slice (its own slope/intercept) and its header without pixels."""
    try:
        dataset = pydicom.dcmread(path)
    except Exception as error:
        raise ScanError(
            f"{path}: DICOM file cannot be read, truncated or corrupt ({error})"
        ) from error
    if not any(k in dataset for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ScanError(f"{path}: no pixel data (PixelData attribute missing)")
    if int(dataset.get("NumberOfFrames") or 1) != 1:
        raise ScanError(
            f"{path}: a multi-frame image ({dataset.NumberOfFrames} frames); expected one slice "
            "per file"
        )
    try:
        stored = dataset.pixel_array
    except Exception as error:
        raise ScanError(
            f"{path}: pixel data cannot be decoded, truncated or corrupt ({error})"
        ) from error
    if stored.shape != (dataset.Rows, dataset.Columns):
        raise ScanError(f"{path}: pixel data of shape {stored.shape}, expected one 2D slice")
    # MONOCHROME1 only tells a viewer to invert the grey scale; a PET value is an activity
    # whatever the display, so stored values are never inverted (GDCM, hence SimpleITK, does).
    slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
    values = stored.astype(np.float64) * slope + intercept
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in dataset:
            delattr(dataset, keyword)
    return values, dataset


def _units_from_dicom(header: Dataset) -> str:
    units = str(header.get("Units", "") or "").strip()
    # The writer stores "unknown" as NONE, the only Units term that claims no physical unit.
    if units in ("", "NONE"):
        return "unknown"
    if units == "GML" and str(header.get("SUVType", "BW") or "BW") == "BW":
        return "SUVbw"
    return units


def _read_dicom_volume(folder: Path, series_uid: str | None) -> Volume:
    members = _choose_series(folder, series_uid)
    paths = [p for p, _ in members]
    order, affine, spacing = _dicom_geometry([h for _, h in members], paths)
    slices, headers = [], []
    for index in order:
        values, header = _slice_values(paths[index])
        slices.append(values)
        headers.append(header)
    first = headers[0]
    meta = {
        "source_path": str(folder),
        "series_description": str(first.get("SeriesDescription", "")),
    }
    try:
        meta["suv_factor"] = _suv_bw_factor(headers, folder)
    except ScanError:
        pass  # SUV is optional unless asked for; _convert_units reports what is missing.
    return Volume(
        data=np.stack(slices).astype(np.float32),
        spacing=spacing,
        units=_units_from_dicom(first),
        patient_id=str(first.get("PatientID", "") or "anonymous"),
        series_uid=str(first.SeriesInstanceUID),
        affine=affine,
        space="LPS",
        headers=headers,
        meta=meta,
    )


# --------------------------------------------------------------------------------------------
# SUV
# --------------------------------------------------------------------------------------------


def _required(dataset: Dataset, keyword: str, source, context: str = "") -> object:
    value = dataset.get(keyword)
    if value is None or value == "":
        where = f" in {context}" if context else ""
        raise ScanError(f"{source}: SUVbw needs {keyword}{where}, which is missing")
    return value


def _parsed(parse, value, keyword: str, source):
    """A DICOM DA/TM/DT value as a datetime object, or a ScanError naming the attribute."""
    try:
        return parse(str(value))
    except ValueError as error:
        raise ScanError(f"{source}: {keyword} {value!r} is not a valid DICOM date/time") from error


def _datetime(header: Dataset, date_keyword: str, time_keyword: str, source):
    date, time = header.get(date_keyword), header.get(time_keyword)
    if not date or not time:
        return None
    return datetime.datetime.combine(
        _parsed(DA, date, date_keyword, source), _parsed(TM, time, time_keyword, source)
    )


def _suv_bw_factor(headers: Sequence[Dataset], source) -> float:
    """`PatientWeight × 1000 / decayed dose` in g/Bq (see the module docstring)."""
    first = headers[0]
    if _units_from_dicom(first) != "BQML":
        raise ScanError(
            f"{source}: SUVbw needs activity concentrations (Units BQML), the series has Units "
            f"{first.get('Units', 'missing')!r}"
        )
    weight_kg = float(_required(first, "PatientWeight", source))
    sequence = _required(first, "RadiopharmaceuticalInformationSequence", source)
    if len(sequence) == 0:
        raise ScanError(
            f"{source}: SUVbw needs RadiopharmaceuticalInformationSequence, it is empty"
        )
    isotope = sequence[0]
    context = "RadiopharmaceuticalInformationSequence"
    dose_bq = float(_required(isotope, "RadionuclideTotalDose", source, context))
    half_life_s = float(_required(isotope, "RadionuclideHalfLife", source, context))
    decay_correction = str(_required(first, "DecayCorrection", source)).upper()
    if weight_kg <= 0 or dose_bq <= 0 or half_life_s <= 0:
        raise ScanError(
            f"{source}: SUVbw needs positive PatientWeight, RadionuclideTotalDose and "
            f"RadionuclideHalfLife; found {weight_kg}, {dose_bq}, {half_life_s}"
        )
    if decay_correction == "ADMIN":
        return weight_kg * 1000.0 / dose_bq
    if decay_correction != "START":
        raise ScanError(
            f"{source}: SUVbw is defined here for DecayCorrection START or ADMIN, the series has "
            f"{decay_correction!r} (images not decay corrected)"
        )
    acquisitions = [
        moment
        for header in headers
        if (moment := _datetime(header, "AcquisitionDate", "AcquisitionTime", source))
    ]
    scan_start = _datetime(first, "SeriesDate", "SeriesTime", source)
    if acquisitions and (scan_start is None or scan_start > min(acquisitions)):
        scan_start = min(acquisitions)
    if scan_start is None:
        raise ScanError(
            f"{source}: SUVbw needs SeriesDate/SeriesTime or AcquisitionDate/AcquisitionTime, "
            "which are missing"
        )
    if isotope.get("RadiopharmaceuticalStartDateTime"):
        injection = _parsed(
            DT, isotope.RadiopharmaceuticalStartDateTime, "RadiopharmaceuticalStartDateTime", source
        )
    else:
        start_time = _required(isotope, "RadiopharmaceuticalStartTime", source, context)
        injection = datetime.datetime.combine(
            scan_start.date(), _parsed(TM, start_time, "RadiopharmaceuticalStartTime", source)
        )
        if injection > scan_start:  # injected before midnight, scanned after
            injection -= datetime.timedelta(days=1)
    # Scanner clocks rarely carry a time zone; compare wall-clock times.
    injection = injection.replace(tzinfo=None)
    delay_s = (scan_start.replace(tzinfo=None) - injection).total_seconds()
    if delay_s < 0:
        raise ScanError(
            f"{source}: injection time {injection} is after the scan start {scan_start}"
        )
    decayed_dose_bq = dose_bq * 2.0 ** (-delay_s / half_life_s)
    return weight_kg * 1000.0 / decayed_dose_bq


def _convert_units(volume: Volume, units: str | None, source: Path) -> Volume:
    if units is None or units == volume.units:
        return volume
    if units != "SUVbw":
        raise ScanError(
            f"{source}: cannot convert units {volume.units!r} to {units!r}; "
            "units must be None (keep) or 'SUVbw'"
        )
    if volume.headers is None:
        raise ScanError(
            f"{source}: SUVbw needs the DICOM patient weight and dose; this source has no DICOM "
            f"header and its units are {volume.units!r}"
        )
    factor = _suv_bw_factor(volume.headers, source)
    return volume.replace(
        data=volume.data * np.float32(factor),
        units="SUVbw",
        meta={**volume.meta, "suv_factor": factor},
    )


# --------------------------------------------------------------------------------------------
# Writing NIfTI
# --------------------------------------------------------------------------------------------


def _affine_in(volume: Volume, space: str) -> np.ndarray:
    if volume.space not in ("LPS", "RAS"):
        raise ScanError(f"Volume.space must be 'LPS' or 'RAS', got {volume.space!r}")
    affine = np.asarray(volume.affine, np.float64)
    return affine if volume.space == space else _LPS_TO_RAS @ affine


def _refuse_source(target: Path, volume: Volume) -> None:
    source = volume.meta.get("source_path")
    if source is None:
        return
    source = Path(source).resolve()
    target = target.resolve()
    if target == source or (source.is_dir() and source in target.parents):
        raise ScanError(f"{target}: refusing to write into the input {source}")


def write_nifti(volume: Volume, path) -> Path:
    """Write `volume` as a float32 NIfTI file (`.nii` or `.nii.gz`) and return its path.

    `nifti[i, j, k] = data[k, j, i]` with the volume's affine (converted from LPS to RAS for
    DICOM sources; a resized grid keeps the source's field of view, as in `write_dicom`), so
    `read_volume` gives back the same array and geometry. Units go into the header's description
    field (`units=BQML`), where `read_volume` finds them again. The file appears complete or not
    at all (temporary name, then rename); an existing file is replaced, except the volume's own
    source.
    """
    path = Path(path)
    if not _is_nifti(path):
        raise ScanError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    _refuse_source(path, volume)
    data = np.asarray(volume.data, np.float32)
    if not np.all(np.isfinite(data)):
        raise ScanError(f"{path}: the volume holds NaN or infinite values; nothing written")
    affine = _LPS_TO_RAS @ _grid_affine(volume)
    image = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine)
    sform_code, qform_code = volume.meta.get("nifti_codes", (1, 1))
    image.header.set_sform(affine, code=int(sform_code) or 1)
    image.header.set_qform(affine, code=int(qform_code) or 1)
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = f"petsr_jax units={volume.units}"[:79].encode("ascii", "replace")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = _nifti_suffix(path)
    temporary = path.with_name(f".{path.name[: -len(suffix)]}.{uuid.uuid4().hex}.tmp{suffix}")
    try:
        nib.save(image, str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# Writing DICOM
# --------------------------------------------------------------------------------------------

# Attributes describing the patient, study, frame of reference, equipment and acquisition, copied
# from the source so the derived series sits beside it; everything else (private tags included)
# is left behind.
_SERIES_LEVEL_COPY = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "Laterality",
    "PatientPosition",
    "ProtocolName",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "StationName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "CountsSource",
    "SeriesType",
    "DecayCorrection",
    "CorrectedImage",
    "CollimatorType",
    "ReconstructionMethod",
    "AttenuationCorrectionMethod",
    "ScatterCorrectionMethod",
    "RandomsCorrectionMethod",
    "RadiopharmaceuticalInformationSequence",
    "PatientOrientationCodeSequence",
    "PatientGantryRelationshipCodeSequence",
    "LossyImageCompression",
)
_SLICE_LEVEL_COPY = (
    "AcquisitionDate",
    "AcquisitionTime",
    "ActualFrameDuration",
    "FrameReferenceTime",
    "DecayFactor",
    "DoseCalibrationFactor",
    "SliceThickness",
)
# Type 2 attributes of the PET Image IOD: present in every file, empty when the source lacks them.
_TYPE2_EMPTY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
    "PositionReferenceIndicator",
    "Manufacturer",
    "CorrectedImage",
    "CollimatorType",
    "AcquisitionDate",
    "AcquisitionTime",
    "ActualFrameDuration",
    "SliceThickness",
)
_TYPE2_EMPTY_SEQUENCES = (
    "RadiopharmaceuticalInformationSequence",
    "PatientOrientationCodeSequence",
    "PatientGantryRelationshipCodeSequence",
)


def _format_ds(value) -> str:
    return format_number_as_ds(float(value))


def _copied(element):
    """A copy of a source element with decimal strings shortened to DICOM's 16 characters.

    Scanners and converters often write DS values longer than the standard allows (e.g.
    `2.7799999930641364`); copying them verbatim would make the new series invalid.
    """
    element = copy.deepcopy(element)
    if element.VR == "DS" and element.value not in (None, ""):
        values = element.value if element.VM > 1 else [element.value]
        formatted = [_format_ds(v) for v in values]
        element.value = formatted if element.VM > 1 else formatted[0]
    elif element.VR == "SQ":
        for item in element.value:
            for inner in list(item):
                item[inner.tag] = _copied(inner)
    return element


def _copy_attributes(target: Dataset, source: Dataset | None, keywords: Sequence[str]) -> None:
    if source is None:
        return
    for keyword in keywords:
        if keyword in source:
            element = source.data_element(keyword)
            target[element.tag] = _copied(element)


def _dicom_units(units: str) -> tuple[str, str | None]:
    """(Units, SUVType) for a volume's units: 'SUVbw' is stored as g/mL with SUV type BW."""
    if units == "SUVbw":
        return "GML", "BW"
    if units == "unknown":
        return "NONE", None
    if units not in _DICOM_UNITS:
        raise ScanError(
            f"units {units!r} have no DICOM PET Units term; expected 'SUVbw', 'unknown' or one "
            f"of {sorted(_DICOM_UNITS)}"
        )
    return units, None


def _grid_affine(volume: Volume) -> np.ndarray:
    """The LPS affine of the grid being written, `(i, j, k) -> mm`.

    When the in-plane size differs from the source headers while the volume still carries the
    source affine (e.g. a super-resolved volume made with `volume.replace(data=sr)`), the new
    grid covers the same field of view: pixel spacing scales by old/new size and the centre of
    the first pixel moves by half the change in spacing. A volume whose affine was updated by the
    caller is written with that affine as it is.
    """
    affine = _affine_in(volume, "LPS").copy()
    _, rows, columns = volume.data.shape
    if not volume.headers:
        return affine
    source_size = (volume.headers[0].get("Rows"), volume.headers[0].get("Columns"))
    if source_size == (rows, columns):
        return affine
    try:
        _, source_affine, _ = _dicom_geometry(
            volume.headers, [f"source header {k}" for k in range(len(volume.headers))]
        )
    except ScanError:
        return affine  # headers without usable geometry: the affine is all there is
    if not np.allclose(affine, source_affine, atol=1e-4):
        return affine
    old_columns_axis, old_rows_axis = affine[:3, 0].copy(), affine[:3, 1].copy()
    affine[:3, 0] = old_columns_axis * source_size[1] / columns
    affine[:3, 1] = old_rows_axis * source_size[0] / rows
    affine[:3, 3] += (affine[:3, 0] - old_columns_axis) / 2 + (affine[:3, 1] - old_rows_axis) / 2
    return affine


def _quantise(values: np.ndarray, signed: bool) -> tuple[np.ndarray, float]:
    """16-bit stored values and the RescaleSlope that maps them back within slope / 2.

    The PET Image IOD fixes RescaleIntercept at 0, so the slope alone spans the range: the
    largest magnitude maps to the largest stored integer. An all-zero slice gets slope 1.
    """
    limit = 32767 if signed else 65535
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    slope = float(_format_ds(peak / limit)) if peak > 0 else 1.0
    dtype = np.int16 if signed else np.uint16
    lowest = -limit if signed else 0
    stored = np.clip(np.rint(values / slope), lowest, limit).astype(dtype)
    return stored, slope


def _now() -> tuple[str, str]:
    moment = datetime.datetime.now()
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S.%f")


def write_dicom(
    volume: Volume,
    out_dir,
    *,
    series_description: str = "petsr_jax",
    series_number: int | None = None,
) -> list[Path]:
    """Write `volume` as a new derived PET series (one 16-bit file per slice) in `out_dir`.

    The series gets new Series/SOP Instance UIDs, ImageType DERIVED\\PRIMARY and
    `series_description`; patient, study, frame of reference, equipment and isotope attributes
    are copied from `volume.headers` when present (StudyInstanceUID and FrameOfReferenceUID
    too, so viewers overlay it on the source), and the attributes the PET Image IOD requires
    are filled otherwise: Type 2 ones empty, Type 1 ones with the least committal value
    (CountsSource EMISSION, SeriesType STATIC\\IMAGE, DecayCorrection NONE, FrameReferenceTime
    0, SeriesDate/Time the time of writing). Values are stored with a per-slice RescaleSlope
    (signed when the volume has negative values) and read back within half a slope.

    The whole series is written into a temporary sibling folder, then renamed to `out_dir`;
    an existing non-empty `out_dir`, or one inside the volume's source folder, is refused.
    Reading the series back gives the slices in increasing position along the slice normal,
    which reverses the slice axis of a volume whose affine is left-handed.

    Returns:
      The written file paths, in slice order.
    """
    out_dir = Path(out_dir)
    data = np.asarray(volume.data, np.float32)
    n_slices, rows, columns = data.shape
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ScanError(f"{out_dir}: already exists and is not an empty folder; nothing written")
    _refuse_source(out_dir, volume)
    if not np.all(np.isfinite(data)):
        raise ScanError(f"{out_dir}: the volume holds NaN or infinite values; nothing written")
    if len(series_description) > 64:
        raise ScanError(f"series_description is {len(series_description)} characters; max 64")
    units, suv_type = _dicom_units(volume.units)
    affine = _grid_affine(volume)
    column_spacing, row_spacing = np.linalg.norm(affine[:3, :2], axis=0)
    if min(column_spacing, row_spacing) <= 0:
        raise ScanError(f"{out_dir}: the volume's affine has a zero in-plane axis")
    orientation = np.concatenate([affine[:3, 0] / column_spacing, affine[:3, 1] / row_spacing])
    if abs(orientation[:3] @ orientation[3:]) > 1e-4:
        raise ScanError(
            f"{out_dir}: the volume's in-plane axes are not perpendicular (sheared affine), "
            "which DICOM cannot store"
        )
    normal = np.cross(orientation[:3], orientation[3:])
    positions = affine[:3, 3] + np.arange(n_slices)[:, None] * affine[:3, 2]

    headers = volume.headers or []
    source = headers[0] if headers else None
    per_slice_source = len(headers) == n_slices
    signed = bool(np.any(data < 0))
    created_date, created_time = _now()
    series_uid = generate_uid()

    shared = Dataset()
    for keyword in _TYPE2_EMPTY:
        setattr(shared, keyword, "")
    for keyword in _TYPE2_EMPTY_SEQUENCES:
        setattr(shared, keyword, DicomSequence())
    shared.SpecificCharacterSet = "ISO_IR 100"
    shared.PatientID = volume.patient_id
    shared.CountsSource = "EMISSION"
    shared.SeriesType = ["STATIC", "IMAGE"]
    shared.DecayCorrection = "NONE"
    shared.LossyImageCompression = "00"
    shared.SeriesDate, shared.SeriesTime = created_date, created_time
    _copy_attributes(shared, source, _SERIES_LEVEL_COPY)
    for isotope in shared.RadiopharmaceuticalInformationSequence:
        if "RadionuclideCodeSequence" not in isotope:
            isotope.RadionuclideCodeSequence = DicomSequence()  # Type 2 inside the item
    if "BodyPartExamined" not in shared and "Laterality" not in shared:
        shared.Laterality = ""
    if "StudyInstanceUID" not in shared or not shared.StudyInstanceUID:
        shared.StudyInstanceUID = generate_uid()
    if "FrameOfReferenceUID" not in shared or not shared.FrameOfReferenceUID:
        shared.FrameOfReferenceUID = generate_uid()
    shared.SOPClassUID = PositronEmissionTomographyImageStorage
    shared.Modality = "PT"
    shared.SeriesInstanceUID = series_uid
    shared.SeriesDescription = series_description
    if series_number is not None:
        shared.SeriesNumber = int(series_number)
    shared.ImageType = ["DERIVED", "PRIMARY"]
    shared.InstanceCreationDate, shared.InstanceCreationTime = created_date, created_time
    shared.ContentDate, shared.ContentTime = created_date, created_time
    shared.Units = units
    if suv_type is not None:
        shared.SUVType = suv_type
    shared.NumberOfSlices = n_slices
    shared.ImageOrientationPatient = [_format_ds(v) for v in orientation]
    shared.PixelSpacing = [_format_ds(row_spacing), _format_ds(column_spacing)]
    shared.SamplesPerPixel = 1
    shared.PhotometricInterpretation = "MONOCHROME2"
    shared.Rows, shared.Columns = rows, columns
    shared.BitsAllocated, shared.BitsStored, shared.HighBit = 16, 16, 15
    shared.PixelRepresentation = int(signed)
    shared.RescaleIntercept = "0"
    if volume.series_uid:
        shared.DerivationDescription = f"petsr_jax, from series {volume.series_uid}"

    temporary = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.tmp")
    names = [f"slice_{k + 1:04d}.dcm" for k in range(n_slices)]
    try:
        temporary.mkdir(parents=True)
        for k in range(n_slices):
            dataset = copy.deepcopy(shared)
            slice_source = headers[k] if per_slice_source else source
            _copy_attributes(dataset, slice_source, _SLICE_LEVEL_COPY)
            if "FrameReferenceTime" not in dataset:
                dataset.FrameReferenceTime = "0"
            if dataset.DecayCorrection != "NONE" and "DecayFactor" not in dataset:
                # Type 1C: the source says images are decay corrected but not by how much;
                # this series applies no further decay scaling of its own.
                dataset.DecayFactor = "1"
            if per_slice_source and "SOPInstanceUID" in slice_source:
                reference = Dataset()
                reference.ReferencedSOPClassUID = slice_source.get(
                    "SOPClassUID", PositronEmissionTomographyImageStorage
                )
                reference.ReferencedSOPInstanceUID = slice_source.SOPInstanceUID
                dataset.SourceImageSequence = DicomSequence([reference])
            dataset.SOPInstanceUID = generate_uid()
            dataset.InstanceNumber = k + 1
            dataset.ImageIndex = k + 1
            dataset.ImagePositionPatient = [_format_ds(v) for v in positions[k]]
            dataset.SliceLocation = _format_ds(positions[k] @ normal)
            stored, slope = _quantise(data[k], signed)
            dataset.RescaleSlope = _format_ds(slope)
            dataset.PixelData = stored.tobytes()
            dataset.file_meta = FileMetaDataset()
            dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            dataset.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            dataset.save_as(temporary / names[k], enforce_file_format=True)
        os.rename(temporary, out_dir)
    except OSError as error:
        raise ScanError(f"{out_dir}: cannot write the series ({error}); nothing written") from error
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    return [out_dir / name for name in names]
