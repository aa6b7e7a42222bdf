"""DICOM PET series: found in a folder, read as one `Volume`, and written as a new series.

`Volume.data[k, j, i]`: `k` is the slice, ordered by ImagePositionPatient projected on the slice
normal (row cosines × column cosines of ImageOrientationPatient), never by file name or
InstanceNumber; `j` is the pixel row, `i` the pixel column. `affine` maps `(i, j, k)` to DICOM
patient space (LPS, mm); the slice spacing comes from the positions, not SliceThickness. Values
are in physical units: each slice gets its own RescaleSlope/RescaleIntercept (PET stores a
different slope on every slice).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import datetime
import warnings
from collections.abc import Sequence
from pathlib import Path

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
from pydicom.valuerep import format_number_as_ds

from petsr_jax.io.errors import ScanError
from petsr_jax.io.files import (
    Staged,
    commit,
    is_temporary,
    refuse_existing_target,
    refuse_source,
    remove_stale_temporaries,
    staging,
    temporary_name,
)
from petsr_jax.io.geometry import dicom_geometry, grid_affine, grid_problem, is_sheared
from petsr_jax.io.units import dicom_units, suv_bw_factor, units_from_dicom
from petsr_jax.volume import Volume

_MAX_NAMES_IN_MESSAGE = 10

# PET Image, Enhanced PET Image and Legacy Converted Enhanced PET Image Storage.
_PET_STORAGE = frozenset(
    {
        str(PositronEmissionTomographyImageStorage),
        "1.2.840.10008.5.1.4.1.1.130",
        "1.2.840.10008.5.1.4.1.1.128.1",
    }
)


@dataclasses.dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in a folder, enough for a user to choose it by `uid`."""

    uid: str
    description: str
    modality: str  # the modality of most of its files
    n_files: int
    files: tuple[Path, ...] = dataclasses.field(repr=False, default=())
    # Files whose Modality differs from `modality` (a slice re-labelled by an editing tool).
    odd_files: tuple[tuple[Path, str], ...] = dataclasses.field(repr=False, default=())

    def modality_counts(self) -> str:
        """`PT` for a series of one modality; `40 PT, 1 CT (slice_0001.dcm)` otherwise."""
        if not self.odd_files:
            return self.modality
        counts = collections.Counter(m for _, m in self.odd_files)
        names = ", ".join(p.name for p, _ in self.odd_files[:_MAX_NAMES_IN_MESSAGE])
        more = len(self.odd_files) - _MAX_NAMES_IN_MESSAGE
        return (
            f"{self.n_files - len(self.odd_files)} {self.modality}, "
            + ", ".join(f"{n} {m or '(none)'}" for m, n in counts.most_common())
            + f" ({names}{f' and {more} more' if more > 0 else ''})"
        )


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
    for path in sorted(_files_outside_temporaries(folder)):
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


def _files_outside_temporaries(folder: Path) -> list[Path]:
    """Every file under `folder` except those in the writers' temporary names.

    A write killed midway leaves a hidden, partial series beside its target; read as part of
    the folder it would be a second PET series. The leftovers are named so the user can delete
    them (the next write into their folder does so once their process is gone).
    """
    files, leftovers = [], set()
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        temporary = next((k for k, part in enumerate(parts) if is_temporary(part)), None)
        if temporary is not None:
            leftovers.add(folder.joinpath(*parts[: temporary + 1]))
        elif path.is_file():
            files.append(path)
    if leftovers:
        warnings.warn(
            f"{folder}: skipped {len(leftovers)} leftover(s) of an interrupted write: "
            + ", ".join(str(p.relative_to(folder)) for p in sorted(leftovers)),
            stacklevel=4,
        )
    return files


def _sop_class(header: Dataset) -> str:
    meta = getattr(header, "file_meta", None) or Dataset()
    return str(header.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")


def _series_info(uid: str, members: list[tuple[Path, Dataset]]) -> SeriesInfo:
    first = members[0][1]
    modality_of = [(p, str(h.get("Modality", "") or "")) for p, h in members]
    # The modality of most files, not of the first: one re-labelled slice sorted first must not
    # make a PET series look like a CT.
    modality = collections.Counter(m for _, m in modality_of).most_common(1)[0][0]
    return SeriesInfo(
        uid=uid,
        description=str(first.get("SeriesDescription", "")),
        modality=modality,
        n_files=len(members),
        files=tuple(p for p, _ in members),
        odd_files=tuple((p, m) for p, m in modality_of if m != modality),
    )


def _series_table(infos: Sequence[SeriesInfo]) -> str:
    return "\n".join(
        f"  series_uid={i.uid!r}  description={i.description!r}  "
        f"modality={i.modality_counts()}  {i.n_files} files"
        for i in infos
    )


def _refuse_mixed_modalities(folder: Path, info: SeriesInfo) -> None:
    """One series holds one modality: a PET series with a file of another is damaged or edited,
    and reading it would put a non-PET slice into the volume."""
    if info.odd_files:
        raise ScanError(
            f"{folder}: series {info.uid} mixes modalities: {info.modality_counts()}; every "
            f"file of a series holds the same modality: fix the Modality of the other file(s) "
            "or remove them from the folder"
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
                f"{folder}: series {series_uid} has Modality {chosen.modality_counts()!r}; "
                "expected a PET series (Modality PT)"
            )
        _refuse_mixed_modalities(folder, chosen)
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
    _refuse_mixed_modalities(folder, pet[0])
    if len(infos) > 1:
        warnings.warn(
            f"{folder}: reading the only PET series {pet[0].uid}; ignored the other series:\n"
            + _series_table([info for info in infos if info.modality != "PT"]),
            stacklevel=3,
        )
    return series[pet[0].uid]


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


def read_dicom_volume(folder: Path, series_uid: str | None) -> Volume:
    members = _choose_series(folder, series_uid)
    paths = [p for p, _ in members]
    order, affine, spacing = dicom_geometry([h for _, h in members], paths)
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
        meta["suv_factor"] = suv_bw_factor(headers, folder)
    except ScanError:
        pass  # SUV is optional unless asked for; convert_units reports what is missing.
    return Volume(
        data=np.stack(slices).astype(np.float32),
        spacing=spacing,
        units=units_from_dicom(first),
        patient_id=str(first.get("PatientID", "") or "anonymous"),
        series_uid=str(first.SeriesInstanceUID),
        affine=affine,
        space="LPS",
        headers=headers,
        meta=meta,
    )


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
    an existing non-empty `out_dir`, or one inside the volume's source folder, is refused, and
    so is a grid DICOM cannot hold or this reader would refuse (sheared or degenerate).
    Reading the series back gives the slices in increasing position along the slice normal,
    which reverses the slice axis of a volume whose affine is left-handed.

    Returns:
      The written file paths, in slice order.
    """
    out_dir = Path(out_dir)
    staged = stage_dicom(
        volume, out_dir, series_description=series_description, series_number=series_number
    )
    commit([staged])
    return [out_dir / name for name in _slice_names(volume.shape[0])]


def stage_dicom(
    volume: Volume,
    out_dir: Path,
    *,
    series_description: str = "petsr_jax",
    series_number: int | None = None,
) -> Staged:
    """Check everything, then write the series into a temporary folder for `commit` to rename."""
    refuse_existing_target(out_dir)
    refuse_source(out_dir, volume)
    data = np.asarray(volume.data, np.float32)
    if not np.all(np.isfinite(data)):
        raise ScanError(f"{out_dir}: the volume holds NaN or infinite values; nothing written")
    if len(series_description) > 64:
        raise ScanError(f"series_description is {len(series_description)} characters; max 64")
    geometry = _series_geometry(volume, out_dir)
    shared = _shared_header(volume, geometry, series_description, series_number)
    headers = volume.headers or []
    per_slice_source = len(headers) == len(data)
    temporary = temporary_name(out_dir)
    with staging(out_dir, temporary, "series"):
        temporary.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(temporary.parent)
        temporary.mkdir()
        for k, name in enumerate(_slice_names(len(data))):
            slice_source = headers[k] if per_slice_source else (headers or [None])[0]
            dataset = _slice_dataset(shared, data[k], k, geometry, slice_source, per_slice_source)
            dataset.save_as(temporary / name, enforce_file_format=True)
    return Staged(temporary, out_dir)


def _slice_names(n_slices: int) -> list[str]:
    return [f"slice_{k + 1:04d}.dcm" for k in range(n_slices)]


@dataclasses.dataclass(frozen=True)
class _SeriesGeometry:
    orientation: np.ndarray  # row direction, column direction
    pixel_spacing: tuple[float, float]  # between rows, between columns
    normal: np.ndarray
    positions: np.ndarray  # [slices, 3], LPS mm


def _series_geometry(volume: Volume, out_dir: Path) -> _SeriesGeometry:
    """Orientation, spacing and slice positions of the grid, refused when DICOM cannot hold it."""
    affine = grid_affine(volume)
    if problem := grid_problem(affine):
        raise ScanError(f"{out_dir}: {problem}; nothing written")
    column_spacing, row_spacing = np.linalg.norm(affine[:3, :2], axis=0)
    orientation = np.concatenate([affine[:3, 0] / column_spacing, affine[:3, 1] / row_spacing])
    if abs(orientation[:3] @ orientation[3:]) > 1e-4:
        raise ScanError(
            f"{out_dir}: the volume's in-plane axes are not perpendicular (sheared affine), "
            "which DICOM cannot store; nothing written"
        )
    if is_sheared(affine):
        raise ScanError(
            f"{out_dir}: the volume's slices are not stacked perpendicular to their plane (a "
            "sheared grid, e.g. a tilted gantry), which a PET series read back as one volume "
            "cannot hold; nothing written"
        )
    normal = np.cross(orientation[:3], orientation[3:])
    positions = affine[:3, 3] + np.arange(volume.shape[0])[:, None] * affine[:3, 2]
    return _SeriesGeometry(orientation, (row_spacing, column_spacing), normal, positions)


def _shared_header(
    volume: Volume,
    geometry: _SeriesGeometry,
    series_description: str,
    series_number: int | None,
) -> Dataset:
    """The attributes every slice of the new series shares."""
    n_slices, rows, columns = volume.shape
    units, suv_type = dicom_units(volume.units)
    source = volume.headers[0] if volume.headers else None
    created_date, created_time = _now()

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
    shared.SeriesInstanceUID = generate_uid()
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
    shared.ImageOrientationPatient = [_format_ds(v) for v in geometry.orientation]
    shared.PixelSpacing = [_format_ds(v) for v in geometry.pixel_spacing]
    shared.SamplesPerPixel = 1
    shared.PhotometricInterpretation = "MONOCHROME2"
    shared.Rows, shared.Columns = rows, columns
    shared.BitsAllocated, shared.BitsStored, shared.HighBit = 16, 16, 15
    shared.PixelRepresentation = int(bool(np.any(volume.data < 0)))
    shared.RescaleIntercept = "0"
    if volume.series_uid:
        shared.DerivationDescription = f"petsr_jax, from series {volume.series_uid}"
    return shared


def _slice_dataset(
    shared: Dataset,
    values: np.ndarray,
    k: int,
    geometry: _SeriesGeometry,
    slice_source: Dataset | None,
    per_slice_source: bool,
) -> Dataset:
    """Slice `k` of the series: its position, its own RescaleSlope and its source reference."""
    dataset = copy.deepcopy(shared)
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
    dataset.ImagePositionPatient = [_format_ds(v) for v in geometry.positions[k]]
    dataset.SliceLocation = _format_ds(geometry.positions[k] @ geometry.normal)
    stored, slope = _quantise(values, signed=bool(dataset.PixelRepresentation))
    dataset.RescaleSlope = _format_ds(slope)
    dataset.PixelData = stored.tobytes()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return dataset
