"""What enhancement does to the activity of a scan: outputs kept physical, changes made visible.

A PET voxel holds an activity concentration, which cannot be negative. A network trained on
residuals can undershoot next to hot structures (ringing around spheres), so an enhanced scan
is clipped at 0 after it is mapped back to physical units (`clip_negative`): a viewer or a
quantitative tool reading the output never meets a negative activity. The clip is one-sided and
counted, so it is never silent.

Super-resolution redistributes activity; it should not create or remove it. `activity_change`
compares an output with its input (total activity as the sum over voxels, which for one grid is
proportional to the activity in the field of view, and the maximum, which drives SUVmax), so a
user sees at once when an enhancement shifted quantitation: `total −0.4 %, max +12.3 %`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from petsr_jax.io.errors import ScanError
from petsr_jax.io.files import write_json_atomic

# Name of the record `launch/enhance.py` writes beside its outputs.
RECORD_NAME = "activity_changes.json"


def clip_negative(activity: np.ndarray) -> tuple[np.ndarray, int]:
    """`activity` with negative voxels set to 0 (activity is never negative), and how many
    voxels were changed."""
    activity = np.asarray(activity)
    negative = int(np.count_nonzero(activity < 0))
    if not negative:
        return activity, 0
    return np.maximum(activity, 0).astype(activity.dtype, copy=False), negative


@dataclasses.dataclass(frozen=True)
class ActivityChange:
    """An output's total and maximum activity against its input's, in the input's units."""

    units: str
    total_input: float
    total_output: float
    max_input: float
    max_output: float
    clipped_voxels: int = 0
    voxels: int = 0

    @property
    def total_change(self) -> float:
        """Relative change of the summed activity (0.01 = +1 %)."""
        return _relative(self.total_output, self.total_input)

    @property
    def max_change(self) -> float:
        """Relative change of the maximum voxel (0.01 = +1 %)."""
        return _relative(self.max_output, self.max_input)

    def summary(self) -> str:
        """`total −0.4 %, max +12.3 %, 12 voxels clipped to 0 (0.001 % of the scan)`: a log line."""
        text = f"total {_percent(self.total_change)}, max {_percent(self.max_change)}"
        if self.clipped_voxels:
            share = 100 * self.clipped_voxels / max(self.voxels, 1)
            text += f", {self.clipped_voxels} voxels clipped to 0 ({share:.3g} % of the scan)"
        return text

    def as_record(self) -> dict:
        """The fields and both relative changes, as JSON-ready numbers."""
        return {
            **dataclasses.asdict(self),
            "total_change": self.total_change,
            "max_change": self.max_change,
        }


def activity_change(
    source: np.ndarray, output: np.ndarray, *, units: str = "unknown", clipped_voxels: int = 0
) -> ActivityChange:
    """How `output` (already clipped, with `clipped_voxels` counted) differs from `source`."""
    source = np.asarray(source, np.float64)
    output = np.asarray(output, np.float64)
    return ActivityChange(
        units=str(units),
        total_input=float(source.sum()),
        total_output=float(output.sum()),
        max_input=float(source.max(initial=0.0)),
        max_output=float(output.max(initial=0.0)),
        clipped_voxels=int(clipped_voxels),
        voxels=int(output.size),
    )


def record_changes(folder, changes: dict[str, ActivityChange]) -> Path:
    """Add per-scan changes to `<folder>/activity_changes.json` and return its path.

    Entries of earlier runs into the same folder are kept (a scan enhanced again replaces its
    own entry). The file is replaced in one rename, so a reader never sees half of it. A write
    that fails (permissions, a full disk) leaves the previous record and raises one `ScanError`
    naming the file and the cause.
    """
    path = Path(folder) / RECORD_NAME
    records = {}
    if path.is_file():
        try:
            records = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            records = {}  # a damaged record is rebuilt rather than blocking the outputs
    records.update({name: change.as_record() for name, change in changes.items()})
    try:
        write_json_atomic(path, records, sort_keys=True)
    except OSError as error:
        cause = error.strerror or str(error) or type(error).__name__
        raise ScanError(f"{path}: cannot write the activity record ({cause})") from error
    return path


def _relative(new: float, old: float) -> float:
    return (new - old) / old if old else float("nan")


def _percent(fraction: float) -> str:
    """`+12.3 %` / `−0.4 %` with a true minus sign, as a reader expects in a report."""
    return f"{fraction * 100:+.1f} %".replace("-", "−")
