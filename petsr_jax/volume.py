"""The in-memory scan every part of petsr_jax consumes and produces.

Readers (DICOM, NIfTI, the embedded cohort) all return a `Volume`; training, evaluation and
enhancement only ever see `Volume.data`; writers turn a `Volume` back into files. Keeping the
geometry and the source headers beside the pixels is what lets an enhanced scan be written back
in the same physical units and patient space as its source.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """A 3D scan as float32 `[slices, H, W]` in physical units.

    Attributes:
      data: float32 array `[slices, rows, cols]`, slices ordered by increasing position along
        the slice normal (`affine[:3, 2]`), whatever the file order was.
      spacing: voxel size in mm as `(z, y, x)` = (slice spacing, row spacing, column spacing).
      units: physical units of `data`, DICOM spelling where one exists (`"BQML"`, `"SUVbw"`,
        `"CNTS"`, ...) or `"unknown"` when the source does not say.
      patient_id: the patient this scan belongs to (DICOM PatientID or the file stem).
      series_uid: DICOM SeriesInstanceUID of the source, or None for non-DICOM sources.
      affine: 4×4 voxel-index `(col, row, slice)` → patient/world mm, in DICOM LPS for DICOM
        sources and NIfTI RAS for NIfTI sources (see `space`).
      space: `"LPS"` or `"RAS"`, the convention `affine` is written in.
      headers: for DICOM sources, the per-slice source datasets (pixel data removed), in the
        same order as `data`; None otherwise. Writers copy patient/study attributes from them.
      meta: free-form extra facts (e.g. `suv_factor`, the source path) that writers may use.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    units: str = "unknown"
    patient_id: str = "anonymous"
    series_uid: str | None = None
    affine: np.ndarray | None = None
    space: str = "LPS"
    headers: list[Any] | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        data = np.asarray(self.data)
        if data.ndim != 3:
            raise ValueError(f"Volume.data must be [slices, H, W], got shape {data.shape}")
        if data.dtype != np.float32:
            object.__setattr__(self, "data", data.astype(np.float32))
        if len(self.spacing) != 3:
            raise ValueError(f"Volume.spacing must be (z, y, x) in mm, got {self.spacing}")
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        if self.affine is None:
            dz, dy, dx = self.spacing
            object.__setattr__(self, "affine", np.diag([dx, dy, dz, 1.0]))

    def __repr__(self) -> str:
        """A two-line summary: a notebook printing a DICOM volume would otherwise show every
        header of every slice (thousands of lines). The headers stay in `volume.headers`."""
        slices, rows, cols = self.shape
        dz, dy, dx = self.spacing
        headers = "no headers" if self.headers is None else f"{len(self.headers)} DICOM headers"
        source = self.meta.get("source_path", "in memory")
        return (
            f"Volume({slices}×{rows}×{cols} slices×rows×cols, spacing {dz:.4g}×{dy:.4g}×{dx:.4g} "
            f"mm, units {self.units}, patient {self.patient_id!r},\n"
            f"       {self.space} affine, {headers}, source {source})"
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)

    def replace(self, **changes) -> Volume:
        """A copy with some fields changed (e.g. new `data` after super-resolution)."""
        return dataclasses.replace(self, **changes)
