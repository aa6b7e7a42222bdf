"""Trained models applied to scans: `load(workdir)` → a `SuperResolver`, and output planning.

    loading.py   load(workdir), the run's config and data facts, answers for a missing workdir
    resolver.py  SuperResolver: enhance and reconstruct slices, stacks and volumes
    checks.py    what a scan must fit before anything is computed
    outputs.py   enhancement's outputs planned before work, and the warnings after it
    errors.py    InferenceError, IncompatibleInput


    import petsr_jax
    sr = petsr_jax.load("runs/deepsr_x8")          # config.json + best params, no flags
    enhanced = sr(petsr_jax.io.read_volume("scan/"))  # a Volume in, a Volume out
    enhanced = sr(pet, mr=t1)                       # an MR-guided model: PET and its T1
    bicubic, restored = sr.reconstruct(volume)      # degrade ×scale first, then recover

The networks map a bicubic-upscaled image to its restored version at the same size, so there
are two ways to use one on a scan:

* enhance (`sr(x)`, the paper's Fig. 5): the network is applied to the scan as it is, to sharpen
  a scan beyond its acquired resolution;
* reconstruct (`sr.reconstruct(x)`, the paper's Tables 1–3): the scan is first degraded by the
  model's scale with the project's one `degrade()` and then recovered, which shows how much of
  a known original the model gets back.

Inputs and outputs are in physical units. Each call normalises its input the way training did
(`data.normalise`: divided by the volume's maximum; for a model of the paper's domain then each
slice min–max to 8-bit levels, `data.Domain`), runs the network on batches of slices
through one jitted function (compiled once per slice shape, any H × W, nothing padded in plane),
and maps the result back (`Domain.decode`, `data.denormalise`), so outputs come back in the
input's units.

A model trained with MR guidance (config `mr`, `petsr_jax.data.mr`) needs the co-registered T1
of each scan (`mr=`: a Volume on the PET's grid, or an array of its shape), normalised as in
training; a model trained without it refuses one. Both refusals come before any computation.

The package also holds what `launch/enhance.py` decides before any work starts: which patients an
input holds, where each one's output goes, and which outputs it must refuse to write.
"""

from petsr_jax.inference.checks import SPACING_TOLERANCE, UNITS_OVERRIDE
from petsr_jax.inference.errors import IncompatibleInput, InferenceError
from petsr_jax.inference.loading import load, missing_workdir, read_config, read_data_info
from petsr_jax.inference.outputs import (
    FORMATS,
    MAX_DECREASE_TOLERANCE,
    MAX_INCREASE_TOLERANCE,
    MODES,
    TOTAL_ACTIVITY_TOLERANCE,
    EnhanceJob,
    activity_warnings,
    input_patients,
    plan_outputs,
    score_warnings,
    series_number,
)
from petsr_jax.inference.resolver import Reconstruction, SuperResolver

__all__ = [
    "FORMATS",
    "MAX_DECREASE_TOLERANCE",
    "MAX_INCREASE_TOLERANCE",
    "MODES",
    "SPACING_TOLERANCE",
    "TOTAL_ACTIVITY_TOLERANCE",
    "UNITS_OVERRIDE",
    "EnhanceJob",
    "IncompatibleInput",
    "InferenceError",
    "Reconstruction",
    "SuperResolver",
    "activity_warnings",
    "input_patients",
    "load",
    "missing_workdir",
    "plan_outputs",
    "read_config",
    "read_data_info",
    "score_warnings",
    "series_number",
]
