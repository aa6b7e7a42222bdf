"""The MNI152 brain the synthetic heads are drawn from, built from the maps nilearn ships.

The brain comes from the MNI152 2009a maps bundled inside nilearn (no download): the grey- and
white-matter probability maps and the skull-stripped T1. The mask of that T1, closed, is the
intracranial volume, whose outward distance places the CSF rim, skull and scalp shells
(`petsr_jax.sim.shapes`). Everything is stacked into one array so that drawing a patient costs
one trilinear gather per voxel, and built once per process.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

_ATLAS_CHANNELS = ("brain", "grey", "white", "t1", "icv_distance")
# Below the template's lowest slice (z = -72, the medulla), room for the shells around it.
_ATLAS_PAD_BELOW_MM = 20


@dataclasses.dataclass(frozen=True)
class Atlas:
    """The MNI maps the head is drawn from, stacked for one trilinear gather per voxel.

    `stack[x, y, z, c]` on a 1 mm grid whose voxel (0, 0, 0) sits at `origin` (MNI RAS mm);
    channels are `_ATLAS_CHANNELS`: brain occupancy (skull-stripped T1 > 0), grey and white
    matter probabilities, T1 intensity, and the distance (mm) outside the intracranial volume.
    `lesion_sites` are MNI points (mm) deep enough in the brain for lesions, with their depth.
    """

    stack: np.ndarray
    origin: np.ndarray
    lesion_sites: np.ndarray
    lesion_depth_mm: np.ndarray


def _nilearn_map(name: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib
    import nilearn

    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    path = folder / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the MNI152 2009a {name} template that nilearn ships is missing; "
            "reinstall nilearn (pip install --force-reinstall nilearn)"
        )
    image = nib.load(str(path))
    if not np.allclose(np.abs(np.diag(image.affine)[:3]), 1.0):
        raise ValueError(f"{path}: expected a 1 mm template, got affine {image.affine.tolist()}")
    return np.asarray(image.dataobj, np.float32), image.affine


# Exponent that sharpens the template's tissue probabilities into one brain's tissue fractions.
TISSUE_SHARPENING = 3.0


def _sharpen_tissues(grey, white, brain):
    """Tissue fractions of one brain from the population template's probabilities.

    The MNI maps average 152 brains, so the cortical ribbon is smeared over several millimetres
    and a "grey" voxel is rarely more than 70 % grey; a single brain has crisp grey/white and
    grey/CSF boundaries. Raising the three probabilities to a power and renormalising keeps the
    boundaries where they are and the partial volume of their voxels, but restores pure tissue
    either side, so the true grey:white ratio is visible at the scale of the anatomy.
    """
    csf = np.clip(brain - grey - white, 0.0, None)
    powered = [np.power(p, TISSUE_SHARPENING) for p in (grey, white, csf)]
    total = powered[0] + powered[1] + powered[2]
    safe = np.where(total > 0, total, 1.0)
    return powered[0] / safe * brain, powered[1] / safe * brain


@functools.lru_cache(maxsize=1)
def load_atlas() -> Atlas:
    """Build the template maps once per process (a few seconds)."""
    t1, affine = _nilearn_map("t1")
    grey, _ = _nilearn_map("gm")
    white, _ = _nilearn_map("wm")
    pad = ((0, 0), (0, 0), (_ATLAS_PAD_BELOW_MM, 0))
    t1, grey, white = (np.pad(a, pad) for a in (t1, grey, white))
    origin = affine[:3, 3] - np.array([0.0, 0.0, _ATLAS_PAD_BELOW_MM])
    brain = t1 > 0
    grey, white = _brain_tissues(grey, white, brain)
    # The intracranial surface on a 2 mm grid: enough for a surface the skull follows.
    coarse = brain[::2, ::2, ::2]
    icv_distance = _intracranial_distance(coarse, brain.shape)
    stack = np.stack(
        [brain.astype(np.float32), grey, white, t1 * brain, icv_distance], axis=-1
    ).astype(np.float32)
    lesion_sites, lesion_depth_mm = _lesion_sites(coarse, origin)
    return Atlas(
        stack=np.ascontiguousarray(stack),
        origin=origin,
        lesion_sites=lesion_sites,
        lesion_depth_mm=lesion_depth_mm,
    )


def _brain_tissues(grey, white, brain):
    """Grey and white fractions (0..1) inside the skull-stripped brain, sharpened."""
    grey = grey / 255.0
    white = white / 255.0
    # The skull-stripped brain is the template's brain mask; its probability maps are ≤ 1 and
    # zero outside it, so CSF is what the mask holds beyond grey and white matter.
    grey *= brain
    white *= brain
    scale = grey + white
    over = scale > 1.0
    grey[over] /= scale[over]
    white[over] /= scale[over]
    return _sharpen_tissues(grey, white, brain.astype(np.float32))


def _intracranial_distance(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Signed distance (mm, negative inside) from the intracranial volume, on the 1 mm grid.

    The intracranial volume is the brain (`coarse`, on a 2 mm grid) closed over sulci and the
    tentorial gaps; its distances are interpolated back to 1 mm.
    """
    outside = ndi.distance_transform_edt(~coarse, sampling=2.0)
    dilated = outside <= 8.0
    closed = ndi.distance_transform_edt(dilated, sampling=2.0) > 6.0
    closed = ndi.binary_fill_holes(closed | coarse)
    icv_distance = ndi.distance_transform_edt(~closed, sampling=2.0).astype(np.float32)
    icv_distance -= ndi.distance_transform_edt(closed, sampling=2.0).astype(np.float32)
    icv_distance = ndi.zoom(icv_distance, 2.0, order=1, mode="nearest")
    icv_distance = icv_distance[: shape[0], : shape[1], : shape[2]]
    return np.pad(
        icv_distance,
        [(0, n - m) for n, m in zip(shape, icv_distance.shape, strict=True)],
        mode="edge",
    )


def _lesion_sites(coarse: np.ndarray, origin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MNI points (mm) at least 6 mm inside the brain (`coarse`, 2 mm grid), and their depth."""
    depth = ndi.distance_transform_edt(coarse, sampling=2.0)
    sites = np.argwhere(depth >= 6.0)
    lesion_sites = sites * 2.0 + origin
    return lesion_sites.astype(np.float32), depth[tuple(sites.T)].astype(np.float32)


def trilinear(atlas: Atlas, x, y, z) -> np.ndarray:
    """Atlas channels at MNI points (mm): `[..., channels]`; points outside take edge values."""
    stack = atlas.stack
    shape = stack.shape[:3]
    flat = stack.reshape(-1, stack.shape[3])
    indices, weights = [], []
    for coord, origin, n in zip((x, y, z), atlas.origin, shape, strict=True):
        position = np.clip((coord - origin).astype(np.float32), 0.0, n - 1.001)
        lower = position.astype(np.int32)
        indices.append(lower)
        weights.append(position - lower)
    base = ((indices[0] * shape[1] + indices[1]) * shape[2] + indices[2]).ravel()
    along_x, along_y, along_z = ((1 - w, w) for w in weights)
    out = None
    for dx in (0, 1):
        for dy in (0, 1):
            wxy = along_x[dx] * along_y[dy]
            for dz in (0, 1):
                w = (wxy * along_z[dz]).reshape(-1, 1)
                offset = (dx * shape[1] + dy) * shape[2] + dz
                term = np.take(flat, base + offset, axis=0) * w  # float64, as the weights
                if out is None:
                    out = term
                else:
                    out += term
    return out.reshape(*np.shape(x), stack.shape[3])
