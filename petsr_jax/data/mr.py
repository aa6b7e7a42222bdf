"""MR guidance: the co-registered T1 and spatial-coordinate channels beside the degraded PET.

PET/MR scanners acquire a T1 with every PET, on the same patient grid. Song et al. (IEEE TCI
2020) feed a residual CNN the low-resolution PET together with the high-resolution T1 and the
radial and axial position of each pixel; the T1 gives the anatomical edges that the bicubic PET
has lost. Here:

* The T1 is at full resolution: an MR is not degraded (the scanner acquires it sharp). Only the
  PET channel goes through `degrade()`, and the output, and the DeepSR global residual, are PET
  only, so the network can take edges from the T1 but its output is activity.
* The T1 is normalised per volume (`normalise_t1`): divided by the 99.5th percentile of its head
  voxels (those above 5 % of the volume's maximum; air and background noise lie below), so white
  matter sits near 1 whatever the scanner's arbitrary MR units. A percentile, not the maximum: a
  few bright vessels or fat voxels would otherwise set the scale. The same in both data domains
  ("physical", "paper"): the domain is the PET's encoding, the T1 is never 8-bit quantised.
* Coordinates (`mr.coordinates`): the radial distance of a pixel from the slice centre, in units
  of half the slice's smaller side (0 at the centre, 1 at the edge's middle), and the slice's
  axial position in its volume, from -1 (first slice) to 1 (last). They are computed on the
  whole slice before any crop, so a crop keeps each pixel's true position.
* A T1 must be aligned with its PET: the same voxel grid (shape) and the same voxel-to-mm affine
  (`check_alignment`); otherwise the error names the patient, before any training.

Every guidance channel of a slice travels in one float32 array `guide [H, W, C]` (T1 first, then
radial, axial), cropped and flipped with the PET as one record; `network_input` puts it after
the degraded PET on the channel axis inside the jitted step.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

# Which channels a config asks for is a function of its fields alone, so it lives with them.
from petsr_jax.config import guidance_channels as guidance_channels
from petsr_jax.config import input_channels as input_channels
from petsr_jax.data.patients import DataError

T1_PERCENTILE = 99.5
HEAD_FRACTION = 0.05
# Largest affine difference, as a fraction of the smallest voxel, still "the same grid":
# DICOM stores positions as decimal strings, so equal grids differ in the last digits.
AFFINE_TOLERANCE = 0.05


def normalise_t1(t1: np.ndarray, source: str = "") -> np.ndarray:
    """A T1 volume divided by the 99.5th percentile of its head voxels (module docstring).

    `source` (the T1's file) names it in the error for a T1 without a positive voxel.
    """
    t1 = np.asarray(t1, np.float32)
    peak = float(np.max(t1)) if t1.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        raise DataError(
            f"{source or 'the T1'}: its maximum is {peak}, so it holds no MR image to guide "
            "with (an all-zero or empty export?); give the patient's T1 image"
        )
    head = t1[t1 > HEAD_FRACTION * peak]
    scale = float(np.percentile(head, T1_PERCENTILE))
    return (t1 / scale).astype(np.float32)


def check_alignment(
    patient_id: str,
    t1_shape: tuple[int, ...],
    t1_affine: np.ndarray | None,
    pet_shape: tuple[int, ...],
    pet_affine: np.ndarray | None,
    where: str = "",
) -> None:
    """Raise `DataError` naming the patient when a T1 is not on its PET's voxel grid.

    Affines are compared in one convention (the caller converts); None skips that comparison
    (an array without geometry).
    """
    source = f" ({where})" if where else ""
    if tuple(t1_shape) != tuple(pet_shape):
        raise DataError(
            f"patient {patient_id}: the T1{source} has shape {tuple(t1_shape)} but the PET "
            f"{tuple(pet_shape)}; MR guidance needs the T1 resampled onto the PET grid"
        )
    if t1_affine is None or pet_affine is None:
        return
    t1_affine, pet_affine = np.asarray(t1_affine, float), np.asarray(pet_affine, float)
    voxel = float(np.min(np.linalg.norm(pet_affine[:3, :3], axis=0)))
    difference = float(np.max(np.abs(t1_affine - pet_affine)))
    if difference > AFFINE_TOLERANCE * voxel:
        raise DataError(
            f"patient {patient_id}: the T1{source} is not co-registered with the PET: their "
            f"voxel-to-mm affines differ by up to {difference:.3g} mm (voxels of {voxel:.3g} "
            f"mm)\n  T1:  {np.round(t1_affine[:3], 3).tolist()}\n  PET: "
            f"{np.round(pet_affine[:3], 3).tolist()}\n  register and resample the T1 onto the "
            "PET grid"
        )


# Another patient's T1 on the PET's grid passes `check_alignment`. It is caught by the patient
# ids both scans carry (`_patient_ids`) and by how well the T1 matches the PET where it lies
# compared with shifted by `PAIRING_SHIFT_VOXELS` in plane (`pairing_margin`): a patient's own,
# co-registered T1 matches best in place, another anatomy matches no better there than shifted.
# Normalised mutual information (1 = independent, 2 = one image determines the other), measured
# on the embedded cohort's 6 × 6 PET / T1 pairs: own T1 0.046–0.056 better in place than
# shifted by 3 voxels, another patient's at most 0.004.
PAIRING_SHIFT_VOXELS = 3
PAIRING_MARGIN = 0.015
_NMI_BINS = 32
_NMI_MAX_VOXELS = 2_000_000  # a paper-size volume is compared on every few slices
_BIDS_SUBJECT = re.compile(r"(?:^|[^A-Za-z0-9])(sub-[A-Za-z0-9]+)")


def _normalised_mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    joint, _, _ = np.histogram2d(a, b, bins=_NMI_BINS)
    joint = joint / max(joint.sum(), 1.0)

    def entropy(p):
        p = p[p > 0]
        return float(-np.sum(p * np.log(p)))

    h_joint = entropy(joint)
    return (entropy(joint.sum(axis=1)) + entropy(joint.sum(axis=0))) / h_joint if h_joint else 1.0


def pairing_margin(pet, t1) -> tuple[float, float] | None:
    """(NMI of PET and T1 in place, the largest NMI with the T1 shifted by
    `PAIRING_SHIFT_VOXELS` along a row or column), over the T1's head voxels; None when the
    slices are too small to shift or the T1 has no head."""
    pet = np.asarray(pet, np.float32)
    t1 = np.asarray(t1, np.float32)
    if pet.ndim == 2:
        pet, t1 = pet[None], t1[None]
    shift = PAIRING_SHIFT_VOXELS
    if pet.shape != t1.shape or min(pet.shape[1:]) < 8 * shift:
        return None
    step = max(1, -(-pet.size // _NMI_MAX_VOXELS))
    pet, t1 = pet[::step], t1[::step]
    peak = float(t1.max())
    if not np.isfinite(peak) or peak <= 0:
        return None

    def nmi(t1_moved):
        head = t1_moved > HEAD_FRACTION * peak
        return _normalised_mutual_information(pet[head], t1_moved[head])

    in_place = nmi(t1)
    shifted = max(nmi(np.roll(t1, s, axis=a)) for a in (1, 2) for s in (-shift, shift))
    return in_place, shifted


def _patient_ids(volume) -> set[str]:
    """The patient ids a scan states: its DICOM PatientID, a BIDS `sub-<label>` in its path,
    and its name in a data root (`<root>/t1/<id>.nii.gz`, `<root>/<id>[.nii.gz]` beside a
    `t1/` folder). A file name alone (`t1.nii.gz`) states none."""
    ids = set()
    headers = getattr(volume, "headers", None) or []
    patient_id = str(headers[0].get("PatientID", "") or "").strip() if headers else ""
    if patient_id and patient_id.lower() != "anonymous":
        ids.add(f"PatientID {patient_id}")
    source = getattr(volume, "meta", {}).get("source_path")
    if source:
        path = Path(source)
        ids.update(f"BIDS subject {m}" for m in _BIDS_SUBJECT.findall(str(path)))
        stem = path.name.split(".nii")[0]
        if path.parent.name == "t1" or (path.parent / "t1").is_dir():
            ids.add(f"data-root patient {stem}")
    return ids


def pairing_warnings(pet, t1, name: str = "") -> list[str]:
    """Warnings when `t1` (Volume or array) looks like another patient's T1 than the PET's: the
    patient ids they state differ (`_patient_ids`, compared kind by kind), or the T1 matches the
    PET no better in place than shifted (`pairing_margin`). Only warnings: neither check can
    prove a pairing wrong, and both run after `check_alignment` accepted the grid."""
    where = f"{name}: " if name else ""
    problems = []
    pet_ids, t1_ids = _patient_ids(pet), _patient_ids(t1)
    for kind in ("PatientID", "BIDS subject", "data-root patient"):
        mine = {i for i in pet_ids if i.startswith(kind)}
        theirs = {i for i in t1_ids if i.startswith(kind)}
        if mine and theirs and not mine & theirs:
            problems.append(
                f"{where}the PET is of {', '.join(sorted(mine))} but the T1 "
                f"({getattr(t1, 'meta', {}).get('source_path', 'mr=')}) of "
                f"{', '.join(sorted(theirs))}; give this patient's own co-registered T1"
            )
            break
    pet_data = getattr(pet, "data", pet)
    margin = pairing_margin(pet_data, getattr(t1, "data", t1))
    if margin is not None and margin[0] - margin[1] < PAIRING_MARGIN:
        problems.append(
            f"{where}the T1 matches the PET no better in place than shifted by "
            f"{PAIRING_SHIFT_VOXELS} voxels (normalised mutual information {margin[0]:.3f} in "
            f"place, {margin[1]:.3f} shifted); is it this patient's T1, co-registered with "
            "this PET? Another anatomy guides the network with the wrong edges"
        )
    return problems


def radial_map(height: int, width: int) -> np.ndarray:
    """Distance of each pixel centre from the slice centre / half the smaller side, [H, W]."""
    y = np.arange(height, dtype=np.float32) + 0.5 - height / 2
    x = np.arange(width, dtype=np.float32) + 0.5 - width / 2
    return (np.hypot(y[:, None], x[None, :]) / (min(height, width) / 2)).astype(np.float32)


def axial_position(slice_index, depth) -> np.ndarray:
    """Position of a slice in its volume of `depth` slices: -1 (first) to 1 (last)."""
    slice_index, depth = np.asarray(slice_index, np.float32), np.asarray(depth, np.float32)
    return np.where(depth > 1, 2 * slice_index / np.maximum(depth - 1, 1) - 1, 0).astype(np.float32)


def guide_slices(
    t1: np.ndarray, slice_index: np.ndarray, depth, channels: tuple[str, ...]
) -> np.ndarray:
    """float32 `[N, H, W, C]`: the normalised T1 slices `[N, H, W]` and, when `channels` asks,
    each pixel's radial and axial position (`slice_index` of each slice in a volume of
    `depth` slices)."""
    t1 = np.asarray(t1, np.float32)
    n, h, w = t1.shape
    planes = [t1]
    if "radial" in channels:
        planes.append(np.broadcast_to(radial_map(h, w), (n, h, w)))
    if "axial" in channels:
        axial = np.broadcast_to(np.asarray(axial_position(slice_index, depth)), (n,))
        planes.append(np.broadcast_to(axial[:, None, None], (n, h, w)))
    return np.ascontiguousarray(np.stack(planes, axis=-1), np.float32)


def network_input(lr_up, batch) -> jnp.ndarray:
    """The network's input: the degraded PET `lr_up` [N, H, W, 1], then `batch["guide"]` when
    the batch has guidance channels (the PET first: DeepSR's image residual is added to it)."""
    guide = batch.get("guide") if hasattr(batch, "get") else None
    if guide is None:
        return lr_up
    return jnp.concatenate([lr_up, jnp.asarray(guide, lr_up.dtype)], axis=-1)
