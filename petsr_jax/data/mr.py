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

import jax.numpy as jnp
import numpy as np

from petsr_jax.data.patients import DataError

T1_PERCENTILE = 99.5
HEAD_FRACTION = 0.05
# Largest affine difference, as a fraction of the smallest voxel, still "the same grid":
# DICOM stores positions as decimal strings, so equal grids differ in the last digits.
AFFINE_TOLERANCE = 0.05


def guidance_channels(config) -> tuple[str, ...]:
    """Names of the guidance channels a config feeds the network, in channel order."""
    mr = config.get("mr")
    if mr is None or not mr.get("t1", False):
        return ()
    return ("t1", "radial", "axial") if mr.get("coordinates", False) else ("t1",)


def input_channels(config) -> int:
    """Channels of the network input: the degraded PET plus the guidance channels."""
    return 1 + len(guidance_channels(config))


def normalise_t1(t1: np.ndarray) -> np.ndarray:
    """A T1 volume divided by the 99.5th percentile of its head voxels (module docstring)."""
    t1 = np.asarray(t1, np.float32)
    peak = float(np.max(t1)) if t1.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        raise DataError(f"cannot normalise a T1 whose maximum is {peak}")
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
