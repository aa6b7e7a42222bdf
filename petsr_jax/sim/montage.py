"""A picture of a written cohort, to see what a preset looks like before training on it.

It reads the patients back through `petsr_jax.io`, so it shows what users of the root will see,
not what the generator meant to write: PET and T1 at fixed levels from the jaw to the vertex
and through each patient's largest lesion.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np

from petsr_jax.sim.presets import CohortSpec, grid_axes

# MNI heights (mm) of the montage's fixed levels: lower jaw, cerebellum, basal ganglia, upper
# brain.
_MONTAGE_LEVELS_MM = (("jaw", -118.0), ("cerebellum", -38.0), ("basal ganglia", 4.0),
                      ("vertex", 52.0))  # fmt: skip


def save_montage(root, path=None, *, n_patients: int = 3) -> Path:
    """A PNG of a few patients' PET and T1 at several axial levels, read back from disk.

    Columns: the fixed levels of `_MONTAGE_LEVELS_MM` plus the slice through each patient's
    largest lesion. Written to `<root>/montage.png` unless `path` is given.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    root = Path(root)
    description = json.loads((root / "cohort.json").read_text())
    spec = _spec(description)
    _, _, z = grid_axes(spec, spec.size)
    patients = description["patients"][:n_patients]
    columns = len(_MONTAGE_LEVELS_MM) + 1
    figure = Figure(figsize=(2.2 * columns, 2.3 * 2 * len(patients)), dpi=110)
    axes = figure.subplots(2 * len(patients), columns, squeeze=False)
    for row, facts in enumerate(patients):
        _draw_patient(root, facts, z, axes[2 * row], axes[2 * row + 1])
    for axis in axes.flat:
        axis.set_axis_off()
    figure.tight_layout()
    path = root / "montage.png" if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp.png")
    try:
        figure.savefig(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _spec(description: dict) -> CohortSpec:
    """The `CohortSpec` a cohort.json records (JSON turned its tuples into lists)."""
    fields = dict(description["spec"])
    fields["z_range_mm"] = tuple(fields["z_range_mm"])
    fields["counts_per_slice"] = tuple(fields["counts_per_slice"])
    return CohortSpec(**fields)


def _draw_patient(root: Path, facts: dict, z: np.ndarray, pet_row, t1_row) -> None:
    """One patient's PET (top row) and T1 (bottom row) at the montage levels."""
    from petsr_jax import io

    pid = facts["patient_id"]
    pet = io.read_volume(root / pid).data
    t1, _ = io.read_nifti_array(root / "t1" / f"{pid}.nii.gz")
    lesions, _ = io.read_nifti_array(root / "lesions" / f"{pid}.nii.gz")
    levels = [(name, int(np.argmin(np.abs(z - height)))) for name, height in _MONTAGE_LEVELS_MM]
    lesion_slice = _largest_lesion_slice(lesions)
    if lesion_slice is not None:
        label = int(np.bincount(lesions[lesion_slice].ravel())[1:].argmax() + 1)
        kind = facts["lesions"][label - 1]["kind"]
        levels.append((f"{kind} lesion {label}", lesion_slice))
    pet_top = float(np.percentile(pet, 99.9)) or 1.0
    t1_top = float(np.percentile(t1, 99.5)) or 1.0
    for column, (name, index) in enumerate(levels):
        top, bottom = pet_row[column], t1_row[column]
        top.imshow(pet[index], cmap="gray_r", vmin=0, vmax=pet_top)
        bottom.imshow(t1[index], cmap="gray", vmin=0, vmax=t1_top)
        top.set_title(f"{pid} PET · {name}\nslice {index} (z {z[index]:+.0f} mm)", fontsize=7)
        bottom.set_title(f"{pid} T1", fontsize=7)
        if index == lesion_slice:
            outline = (lesions[index] > 0).astype(float)
            top.contour(outline, levels=[0.5], colors="red", linewidths=0.6)


def _largest_lesion_slice(lesions: np.ndarray) -> int | None:
    area = lesions.reshape(lesions.shape[0], -1).astype(bool).sum(1)
    return int(np.argmax(area)) if area.any() else None
