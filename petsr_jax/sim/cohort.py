"""The embedded synthetic FDG-PET brain cohort on disk: the project's default data.

The paper's 33-patient brain FDG-PET data are private, so the project ships a generator for a
cohort that looks and is stored like real scans: one PET DICOM series per patient (16-bit with a
per-slice RescaleSlope, Bq/mL) plus a co-registered T1, brain mask, tissue labels and lesion
labels as NIfTI on the PET grid. It is written once, deterministically from a seed, into a cache
folder in the layout users bring their own data in, so the default path runs the real reader:

    <root>/<patient_id>/              PET DICOM series (petsr_jax.io.read_volume)
    <root>/masks/<patient_id>.nii.gz  brain mask, uint8
    <root>/t1/<patient_id>.nii.gz     T1 MR on the PET grid, float32
    <root>/labels/<patient_id>.nii.gz tissue labels, uint8 (codes in `LABELS`)
    <root>/lesions/<patient_id>.nii.gz lesion labels 1..K, uint8 (facts in cohort.json)
    <root>/cohort.json                generator, version, preset, seed, sizes, per-patient facts

Storage. `write_patient` hands the PET to `petsr_jax.io.write_dicom` (16-bit, one slope per
slice) and the T1 to `petsr_jax.io.write_nifti`; the integer maps are written as uint8 NIfTI with
the same axis mapping and affine, so `io.read_nifti_array` indexes them like the PET. A cohort is
generated into a hidden sibling folder and renamed into place only when complete, with
cohort.json written last: an interrupted run leaves nothing that looks finished.

Versions. `VERSION` changes whenever the same preset and seed would give different data. The
default folder is named after the preset, seed and version (`default_root`), so a cohort cached
by another version of this code is neither reused nor in the way: this version generates its own
beside it (the old folder can be deleted by hand). Only a folder that claims to be finished and
is not (unreadable cohort.json, missing files) stops a run, with the folder to delete.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from petsr_jax.sim.patient import generate_patient
from petsr_jax.sim.presets import PRESETS, CohortSpec
from petsr_jax.sim.tissues import LABELS

# Recorded in cohort.json and part of every DICOM UID's seed: the name the data were first
# published under, kept so that the same preset and seed keep giving the same files.
GENERATOR = "petsr_jax.cohort"
VERSION = "3"  # 3: the small preset draws 16–20 lesions per patient

DEFAULT_ROOT_ENV = "PETSR_DATA_DIR"

_MAP_FOLDERS = ("masks", "t1", "labels", "lesions")


def default_root(preset: str, seed: int) -> Path:
    """`$PETSR_DATA_DIR/cohort-<preset>-seed<seed>-v<VERSION>`, else under `~/.cache/petsr_jax`.

    One folder per preset, seed and generator version (see module docstring).
    """
    base = os.environ.get(DEFAULT_ROOT_ENV) or Path.home() / ".cache" / "petsr_jax"
    return Path(base) / f"cohort-{preset}-seed{seed}-v{VERSION}"


def ensure_cohort(
    preset: str = "paper",
    *,
    root=None,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """The data root of a preset cohort, generated on first use and reused afterwards.

    `root` defaults to `default_root(preset, seed)`. A root holding cohort.json is finished and
    returned as it is, after checking that it is this generator, version, preset and seed and
    that every file it lists is there.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown cohort preset {preset!r}; expected one of {sorted(PRESETS)}")
    root = default_root(preset, seed) if root is None else Path(root).expanduser().absolute()
    if (root / "cohort.json").is_file():
        _check_finished(root, preset, seed)
        return root
    return generate_cohort(
        PRESETS[preset], root, seed=seed, preset=preset, progress=progress, workers=workers
    )


def _check_finished(root: Path, preset: str, seed: int) -> None:
    """A finished root must be the cohort asked for, whole."""
    description = _read_description(root)
    expected = {"generator": GENERATOR, "version": VERSION, "preset": preset, "seed": seed}
    wrong = {k: description.get(k) for k, v in expected.items() if description.get(k) != v}
    if wrong:
        raise ValueError(
            f"{root / 'cohort.json'}: holds {wrong}, expected {expected}; pass another root, or "
            "none to use the default folder of this preset, seed and version"
        )
    missing = _missing_files(root, description)
    if missing:
        raise ValueError(
            f"{root}: damaged cohort, {len(missing)} listed file(s) missing or incomplete "
            f"(first: {missing[0]}); delete {root} to regenerate it"
        )


def _read_description(root: Path) -> dict[str, Any]:
    path = root / "cohort.json"
    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path}: unreadable cohort description ({error}); delete {root} to regenerate it"
        ) from error
    if not _is_well_formed(description):
        raise ValueError(
            f"{path}: not a cohort description (no slice count or patient ids); delete {root} "
            "to regenerate it"
        )
    return description


def _is_well_formed(description) -> bool:
    """cohort.json has what checking the files needs: a slice count and every patient's id."""
    try:
        return int(description["shape"][0]) > 0 and all(
            isinstance(facts["patient_id"], str) for facts in description["patients"]
        )
    except (LookupError, TypeError, ValueError):
        return False


def _missing_files(root: Path, description: dict[str, Any]) -> list[Path]:
    """Files cohort.json lists that are not there: a PET series short of its slices, or maps."""
    n_slices = int(description["shape"][0])
    missing = []
    for facts in description["patients"]:
        pid = facts["patient_id"]
        series = root / pid
        if not series.is_dir() or len(list(series.glob("*.dcm"))) != n_slices:
            missing.append(series)
        maps = (root / folder / f"{pid}.nii.gz" for folder in _MAP_FOLDERS)
        missing.extend(path for path in maps if not path.is_file())
    return missing


def generate_cohort(
    spec: CohortSpec,
    root,
    *,
    seed: int = 0,
    preset: str = "custom",
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Generate a cohort into `root`, which must not hold one yet, and return `root`.

    Patients are generated in parallel worker processes (`workers`, default: the available
    CPUs up to 8, or 1 for cohorts too small to repay starting processes; 1 runs in this
    process) into a hidden sibling folder; cohort.json is written last and the folder renamed
    to `root` only when everything is there.
    """
    from tqdm.auto import tqdm

    root = Path(root).expanduser().absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(
            f"{root}: exists and holds no finished cohort (no cohort.json); remove it or pass "
            "another root"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    workers = _default_workers(spec) if workers is None else max(1, int(workers))
    partial = root.parent / f".{root.name}.partial-{uuid.uuid4().hex}"
    partial.mkdir()
    bar = tqdm(total=spec.n_patients, desc=f"cohort {preset}", unit="patient", disable=not progress)
    try:
        facts = _generate_patients(spec, seed, partial, workers, bar.update)
        description = _description(spec, preset, seed, facts)
        (partial / "cohort.json.tmp").write_text(json.dumps(description, indent=1))
        os.replace(partial / "cohort.json.tmp", partial / "cohort.json")
        _publish(partial, root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        bar.close()
    return root


# Below this many fine-grid voxels in a cohort, starting worker processes (each imports the
# package and builds the template maps) costs more than it saves.
_PARALLEL_MIN_VOXELS = 10_000_000


def _default_workers(spec: CohortSpec) -> int:
    if spec.n_patients * spec.n_slices * spec.truth_size**2 < _PARALLEL_MIN_VOXELS:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    # Each worker holds about 1 GB at the paper size; more than 8 gains little on one host.
    return max(1, min(cpus, spec.n_patients, 8))


def _generate_patients(spec: CohortSpec, seed: int, folder: Path, workers: int, done) -> list:
    """Every patient generated and written into `folder`; their facts in patient order."""
    facts: list[dict | None] = [None] * spec.n_patients
    if workers == 1:
        for index in range(spec.n_patients):
            facts[index] = _generate_and_write(spec, index, seed, str(folder))
            done()
        return facts
    # Spawned, not forked: the parent may have started JAX's threads.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {
            pool.submit(_generate_and_write, spec, index, seed, str(folder)): index
            for index in range(spec.n_patients)
        }
        for future in concurrent.futures.as_completed(futures):
            facts[futures[future]] = future.result()
            done()
    return facts


def _description(spec: CohortSpec, preset: str, seed: int, facts: list) -> dict[str, Any]:
    """The content of cohort.json."""
    return {
        "generator": GENERATOR,
        "version": VERSION,
        "preset": preset,
        "seed": seed,
        "n_patients": spec.n_patients,
        "shape": [spec.n_slices, spec.size, spec.size],
        "spacing_mm": list(spec.spacing),
        "units": "BQML",
        "spec": dataclasses.asdict(spec),
        "labels": {str(code): name for code, name in LABELS.items()},
        "patients": facts,
    }


def _publish(partial: Path, root: Path) -> None:
    """Rename the finished folder into place."""
    try:
        os.rename(partial, root)
    except OSError:
        if not (root / "cohort.json").is_file():
            raise
        # Another process finished the same cohort first; theirs is as good as ours.
        shutil.rmtree(partial, ignore_errors=True)


_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SCT = "SCT"  # SNOMED CT, the coding scheme the PET IOD's code sequences expect


def _code(value: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, _SCT, meaning
    return item


def _dicom_header(spec: CohortSpec, facts: dict, seed: int):
    """Patient, study and acquisition attributes for `io.write_dicom` to copy.

    Only what the simulation defines is filled (F-18 FDG, head-first supine, the corrections
    applied); clinical facts it cannot know (birth date, sex, weight, dose) stay absent, so the
    writer leaves its Type 2 attributes empty. UIDs derive from the seed and patient id, so a
    regenerated cohort keeps its study and frame of reference.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    pid = facts["patient_id"]
    entropy = [GENERATOR, VERSION, str(seed), pid]
    header = Dataset()
    header.PatientName = f"Synthetic^{pid}"
    header.PatientID = pid
    header.StudyInstanceUID = generate_uid(entropy_srcs=[*entropy, "study"])
    header.FrameOfReferenceUID = generate_uid(entropy_srcs=[*entropy, "frame"])
    header.StudyDescription = "Synthetic FDG brain PET"
    header.StudyID = "1"
    header.BodyPartExamined = "BRAIN"
    header.Manufacturer = "petsr_jax"
    header.ManufacturerModelName = f"{GENERATOR} {VERSION}"
    header.CorrectedImage = ["NORM", "ATTN", "SCAT", "RAN"]
    header.ReconstructionMethod = (
        f"OSEM {spec.n_iterations}i{spec.n_subsets}s PSF {spec.recon_psf_fwhm_mm:g}mm"
        + (" 3D" if spec.axial_psf_modelled else "")
        + (" TOF" if spec.tof_gain != 1 else "")
    )[:64]
    header.AttenuationCorrectionMethod = "simulated mu-map"
    header.SliceThickness = f"{spec.slice_mm:.6g}"
    isotope = Dataset()
    isotope.Radiopharmaceutical = "Fluorodeoxyglucose"
    isotope.RadionuclideCodeSequence = Sequence([_code("77004003", "^18^Fluorine")])
    isotope.RadionuclideHalfLife = "6586.2"
    header.RadiopharmaceuticalInformationSequence = Sequence([isotope])
    recumbent = _code("102538003", "recumbent")
    recumbent.PatientOrientationModifierCodeSequence = Sequence([_code("40199007", "supine")])
    header.PatientOrientationCodeSequence = Sequence([recumbent])
    header.PatientGantryRelationshipCodeSequence = Sequence([_code("102540008", "headfirst")])
    return header


def _write_uint8_nifti(array: np.ndarray, affine_lps: np.ndarray, path: Path) -> None:
    """A uint8 map on the PET grid, with the axis mapping and affine of `io.write_nifti`.

    `io.write_nifti` stores float32; masks and labels stay integers so that
    `io.read_nifti_array` returns them as such.
    """
    import nibabel as nib

    image = nib.Nifti1Image(
        np.ascontiguousarray(array.astype(np.uint8).transpose(2, 1, 0)), _LPS_TO_RAS @ affine_lps
    )
    image.header.set_sform(_LPS_TO_RAS @ affine_lps, code=1)
    image.header.set_qform(_LPS_TO_RAS @ affine_lps, code=1)
    image.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.nii.gz")
    try:
        nib.save(image, str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_patient(patient: dict[str, Any], spec: CohortSpec, root: Path, seed: int) -> None:
    """Write one `generate_patient` result into a data root (layout in the module docstring)."""
    from petsr_jax import io
    from petsr_jax.volume import Volume

    facts = patient["facts"]
    pid = facts["patient_id"]
    affine = patient["geometry"]["affine"]
    pet = Volume(
        data=patient["pet"],
        spacing=spec.spacing,
        units="BQML",
        patient_id=pid,
        affine=affine,
        space="LPS",
        headers=[_dicom_header(spec, facts, seed)],
    )
    io.write_dicom(pet, root / pid, series_description="FDG PET PSF-OSEM", series_number=1)
    t1 = Volume(data=patient["t1"], spacing=spec.spacing, patient_id=pid, affine=affine)
    io.write_nifti(t1, root / "t1" / f"{pid}.nii.gz")
    for folder, key in (("masks", "mask"), ("labels", "labels"), ("lesions", "lesions")):
        _write_uint8_nifti(patient[key], affine, root / folder / f"{pid}.nii.gz")


def _generate_and_write(spec: CohortSpec, index: int, seed: int, root: str) -> dict:
    """Worker entry point: one patient generated and written, its facts returned."""
    patient = generate_patient(spec, index, seed)
    write_patient(patient, spec, Path(root), seed)
    return patient["facts"]
