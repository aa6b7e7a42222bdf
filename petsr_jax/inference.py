"""Trained models applied to scans: `load(workdir)` → a `SuperResolver`, and output planning.

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

The module also holds what `launch/enhance.py` decides before any work starts: which patients an
input holds, where each one's output goes, and which outputs it must refuse to write.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from petsr_jax import data, quantitation
from petsr_jax.config import base_config
from petsr_jax.data import mr as mr_guidance
from petsr_jax.evaluation.predict import map_batches
from petsr_jax.io.geometry import affine_in
from petsr_jax.io.units import is_activity_concentration
from petsr_jax.models import abstract_params, create_model
from petsr_jax.run import checkpoint, layout, record
from petsr_jax.task import Task
from petsr_jax.volume import Volume

MODES = ("enhance", "reconstruct")
FORMATS = ("auto", "dicom", "nifti", "both")
# Units that say nothing about the data; a model trained on them is not checked against inputs.
_UNCHECKED_UNITS = frozenset({"unknown", "mixed", "", None})
# How a user accepts an input the unit checks refuse, named in every such refusal.
UNITS_OVERRIDE = (
    "if you know the scan fits the model, enhance it anyway with "
    "sr(volume, check_units=False) or launch/enhance.py --allow_units"
)
# DICOM SeriesDescription is a 64-character LO element.
_MAX_DESCRIPTION = 64
# Relative difference in pixel spacing from the training data above which enhancement warns.
SPACING_TOLERANCE = 0.10


def _mm(spacing) -> str:
    """`2.03 × 2.03 mm`: an in-plane (row, column) pixel spacing for a message."""
    return f"{spacing[0]:.3g} × {spacing[1]:.3g} mm"


# Derived series are numbered after their source, so viewers list them beside it.
_SERIES_NUMBER_OFFSET = 1000


class InferenceError(ValueError):
    """A workdir, input or output that enhancement cannot use; the message says which and why."""


class IncompatibleInput(InferenceError):
    """An input the model was not trained for (units, channels); nothing was computed."""


class Reconstruction(NamedTuple):
    """What `SuperResolver.reconstruct` returns: the degraded input and the model's recovery."""

    bicubic: np.ndarray | Volume
    sr: np.ndarray | Volume


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load(workdir, *, which: str | None = None, batch_size: int | None = None) -> SuperResolver:
    """The trained model of a workdir, ready to apply to slices, volumes and scans.

    Reads `config.json` (written when the run started) and restores the params with Orbax:
    `which="best"` takes the best validation checkpoint and falls back to the latest full state,
    `"last"` takes the latest state; the default is the params the run scored (`eval.weights`:
    "best", or "final" → "last"). No absl flags are needed. `batch_size` (slices per device
    call) defaults to the run's `eval.batch_size`.

    Raises:
      InferenceError: the folder is not a training workdir.
      petsr_jax.run.checkpoint.CheckpointError: it holds no restorable checkpoint for its config,
        or its config.json was edited after training (the fields named).
    """
    workdir = Path(workdir)
    config = read_config(workdir)
    checkpoint.check_config_unedited(workdir)  # else the params load as another model
    if which is None:
        which = "last" if config.eval.get("weights", "best") == "final" else "best"
    model = create_model(config)
    like = abstract_params(
        model,
        int(config.model.get("in_channels", 1)),
        jax.sharding.SingleDeviceSharding(jax.devices()[0]),
    )
    try:
        params = checkpoint.restore_params(workdir, like, which=which)
    except checkpoint.CheckpointError:
        raise
    except Exception as error:  # Orbax raises many types for corrupt or mismatched trees
        raise checkpoint.CheckpointError(
            f"{workdir}: cannot restore the {which} params for the model in config.json "
            f"({type(error).__name__}: {error})"
        ) from error
    unfinished = record.progress(workdir)
    if unfinished:
        checkpoint_kind = "best checkpoint" if which == "best" else "latest checkpoint"
        warnings.warn(f"{unfinished}; using the {checkpoint_kind} so far", stacklevel=2)
    return SuperResolver(
        config, params, workdir=workdir, data_info=read_data_info(workdir), batch_size=batch_size
    )


def read_config(workdir) -> ml_collections.ConfigDict:
    """The locked config a run was trained with, from `<workdir>/config.json`."""
    path = Path(workdir) / layout.CONFIG
    if not Path(workdir).is_dir():
        raise InferenceError(missing_workdir(workdir))
    try:
        fields = layout.read_record(workdir, layout.CONFIG)
    except layout.WorkdirError as error:
        raise InferenceError(str(error)) from None
    if fields is None:
        raise InferenceError(
            f"{path}: missing; a training workdir gets {layout.CONFIG} when launch/main.py "
            "starts the run"
        )
    for section, key in (("model", "name"), (None, "scale")):
        holder = fields.get(section, {}) if section else fields
        if not isinstance(holder, dict) or key not in holder:
            name = f"{section}.{key}" if section else key
            raise InferenceError(f"{path}: field {name} is missing; not a petsr_jax config")
    try:
        defaults = base_config(fields["model"]["name"])
    except ValueError as error:
        raise InferenceError(f"{path}: field model.name: {error}") from None
    # The saved values win; defaults only fill fields added to the project after the run, so
    # an older workdir still loads.
    config = _overlay(defaults, fields)
    config.lock()
    return config


def missing_workdir(workdir) -> str:
    """`<workdir>: no such workdir`, naming the nearest workdirs beside it (folders holding a
    config.json, by name) with the commands that trained them, and the command that trains
    `workdir` itself where its name is a variant's default (`runs/deepsr_x8_small_b6`)."""
    import difflib

    from petsr_jax.cli import variant_workdirs

    workdir = Path(workdir)
    parent = workdir.parent
    runs = []
    if parent.is_dir():
        runs = sorted(p.name for p in parent.iterdir() if (p / layout.CONFIG).is_file())
    text = f"{workdir}: no such workdir"
    close = difflib.get_close_matches(workdir.name, runs, n=3, cutoff=0.6)
    if close:
        named = []
        for name in close:
            command = record.recorded_command(parent / name)
            named.append(str(parent / name) + (f" (trained by: {command})" if command else ""))
        text += f"; nearest: {'; '.join(named)}"
    elif runs:
        shown = ", ".join(runs[:5]) + (", ..." if len(runs) > 5 else "")
        text += f"; runs in {parent}: {shown}"
    trains = {Path(path).name: command for path, command in variant_workdirs().items()}
    if workdir.name in trains:
        where = "" if parent.name == "runs" else f" --workdir={workdir}"
        text += f"; to train it: {trains[workdir.name]}{where}"
    elif not runs:
        text += (
            "; train one first, e.g. python launch/main.py "
            "--config=configs/deepsr.py:scale=8,quick (it writes runs/deepsr_x8_small_b6)"
        )
    return text


def _overlay(defaults: ml_collections.ConfigDict, saved: dict) -> ml_collections.ConfigDict:
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), ml_collections.ConfigDict):
            _overlay(defaults[key], value)
            continue
        if key in defaults:
            del defaults[key]  # the saved type wins too (a field whose type changed since)
        defaults[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    return defaults


def read_data_info(workdir) -> dict | None:
    """`<workdir>/data_info.json` ({"units", "image_size", "pixel_spacing_mm", "root"}), or
    None when absent."""
    try:
        return layout.read_data_info(workdir)
    except layout.WorkdirError as error:
        raise InferenceError(str(error)) from None


# --------------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------------


def _as_slices(x) -> tuple[np.ndarray, Callable]:
    """`x` as float32 `[N, H, W]` slices, and a function giving results back in `x`'s kind."""
    if isinstance(x, Volume):
        return x.data, lambda out: x.replace(data=out)
    array = np.asarray(x, np.float32)
    if array.ndim == 2:
        return array[None], lambda out: out[0]
    if array.ndim == 3:
        return array, lambda out: out
    raise InferenceError(
        f"expected a 2D slice [H, W], a stack of slices [slices, H, W] or a Volume, got an "
        f"array of shape {array.shape}"
    )


def _run_in_batches(fn, params, slices: np.ndarray, batch_size: int, progress, **extra) -> tuple:
    """`fn(params, {"hr": nhwc, **extra})` over `[N, H, W]` slices with the one batched loop
    (`extra`: per-slice `guide`, `context`; None entries left out); `[N, H, W]` outputs."""
    if not len(slices):
        return (np.empty(slices.shape, np.float32),) * 3
    inputs = {"hr": slices[..., None], "index": np.arange(len(slices), dtype=np.int32)}
    inputs.update({k: v for k, v in extra.items() if v is not None})
    result = map_batches(fn, params, inputs, batch_size=batch_size, progress=progress)
    result = result if isinstance(result, tuple) else (result,)
    return tuple(r[..., 0] for r in result)


class SuperResolver:
    """A trained network with its config: `sr(x)` enhances, `sr.reconstruct(x)` degrades first.

    `x` is a 2D slice `[H, W]`, a stack `[slices, H, W]` or a `Volume`, in physical units; the
    result is the same kind, shape and units (a Volume keeps its geometry, headers and meta).

    Attributes:
      config: the run's locked config. params: the restored network params.
      model: the Flax module. scale: the downscaling factor the model was trained for.
      workdir: where it was loaded from (None when built from params directly).
      data_info: the training data's {"units", "image_size", "pixel_spacing_mm", "root"}, or
        None when unknown.
      batch_size: slices per device call.
    """

    def __init__(self, config, params, *, workdir=None, data_info=None, batch_size=None):
        self.config = config
        self.params = params
        self.model = create_model(config)
        self.scale = int(config.scale)
        self.workdir = None if workdir is None else Path(workdir)
        self.data_info = data_info
        self.batch_size = int(batch_size or config.eval.batch_size)
        if self.batch_size < 1:
            raise InferenceError(f"batch_size must be ≥ 1, got {self.batch_size}")
        # What the network was trained to do (degradation, neighbouring slices, MR guidance,
        # activity kept), in the training data's voxels: one object with training's.
        self.task = Task.from_config(config, spacing_mm=_training_spacing(data_info))
        # "physical": each volume / its maximum; "paper": each slice min–max to 8-bit levels
        # (data.Domain), as the model was trained.
        self.domain = self.task.degradation.domain
        # MR guidance channels the model was trained with (none for a PET-only model).
        self.guidance = self.task.guidance
        model, task = self.model, self.task
        self._enhance = jax.jit(lambda p, batch, fwhm_px: task.enhance(model, p, batch, fwhm_px))
        self._reconstruct = jax.jit(lambda p, batch: task.predict(model, p, batch)[:2])

    def __repr__(self) -> str:
        where = f", workdir={str(self.workdir)!r}" if self.workdir else ""
        return f"SuperResolver({self.config.model.name}, scale={self.scale}{where})"

    @property
    def trained_units(self) -> str | None:
        """Units of the training data, or None when the workdir does not say."""
        return None if self.data_info is None else self.data_info.get("units")

    def describe(self, mode: str = "enhance") -> str:
        """What produced an output, short enough for a DICOM SeriesDescription (64 chars)."""
        text = f"SR {self.config.model.name} x{self.scale} {mode}"
        if self.workdir is not None:
            text += f" {self.workdir.resolve().name}"
        return text[:_MAX_DESCRIPTION]

    # -- checks ---------------------------------------------------------------------------

    def _check_channels(self, has_mr: bool = False) -> None:
        """An MR-guided model needs the T1; a PET-only model must not silently ignore one."""
        where = self.workdir or "this model"
        if self.guidance and not has_mr:
            raise IncompatibleInput(
                f"{where} was trained with MR guidance (config mr.t1: PET plus the co-registered "
                "T1); give the scan's T1: sr(volume, mr=t1_volume), or launch/enhance.py "
                "--mr=<T1 series or NIfTI>"
            )
        if has_mr and not self.guidance:
            raise IncompatibleInput(
                f"{where} was trained on PET only (config mr.t1 is off) and cannot use a T1; "
                "enhance without mr= / --mr, or use a workdir trained with the mr flag"
            )
        in_channels = int(self.config.model.get("in_channels", 1))
        if in_channels != self.task.input_channels:
            raise IncompatibleInput(
                f"the model takes {in_channels} input channels (config model.in_channels) but "
                f"its task ({self.task.describe()}) supplies {self.task.input_channels}"
            )

    def guide_for(self, t1, like) -> np.ndarray | None:
        """The guidance channels `[N, H, W, C]` of a T1 (Volume or `[N, H, W]` / `[H, W]`
        array) for the PET `like` (Volume or array): checked against its grid, normalised as in
        training (`mr.normalise_t1`). None for a PET-only model."""
        self._check_channels(t1 is not None)
        if t1 is None:
            return None
        t1_slices, _ = _as_slices(t1)
        pet_slices, _ = _as_slices(like)
        t1_affine = pet_affine = None
        if isinstance(t1, Volume) and isinstance(like, Volume):
            t1_affine = affine_in(t1, "RAS")
            pet_affine = affine_in(like, "RAS")
        name = like.patient_id if isinstance(like, Volume) else "input"
        try:
            mr_guidance.check_alignment(
                name, t1_slices.shape, t1_affine, pet_slices.shape, pet_affine, "mr="
            )
            source = t1.meta.get("source_path", "mr=") if isinstance(t1, Volume) else "mr="
            normalised = mr_guidance.normalise_t1(t1_slices, source=str(source))
        except data.DataError as error:
            raise IncompatibleInput(str(error)) from None
        depth = normalised.shape[0]
        return mr_guidance.guide_slices(normalised, np.arange(depth), depth, self.guidance)

    def check_input(
        self, volume: Volume, name: str | None = None, *, mr=None, check_units: bool = True
    ) -> list[str]:
        """Refuse a volume this model does not fit; return warnings about what cannot be checked.

        The network sees each volume divided by its maximum (or each slice min–max scaled), so
        a scan whose units differ from the training data's by a constant factor (SUVbw, Bq/mL,
        kBq/mL, counts: `io.units.is_activity_concentration`) gives the network exactly the
        input it would in the training units: it is enhanced with a warning, and the output
        stays in the input's units. What can matter is refused (`_units_problems`): a scan of
        another modality than PET, or units that hold another quantity (a parametric map,
        an attenuation map, percentages); `check_units=False` accepts these with a warning, for
        a user who knows better than the header. A pixel spacing more than
        `SPACING_TOLERANCE` from the training data's only warns.

        `mr` is the scan's T1 for an MR-guided model: required by one, refused by any other, and
        checked against the volume's grid.

        Raises:
          IncompatibleInput: channels, T1, modality or units do not fit; the message names
            the input.
        """
        name = name or str(volume.meta.get("source_path", volume.patient_id))
        self.guide_for(mr, volume)  # refuses a missing, unneeded or misaligned T1
        problems = self._units_problems(volume, name, check_units)
        problems += self._spacing_problems(volume, name)
        problems += mr_guidance.pairing_warnings(volume, mr, name) if mr is not None else []
        return problems

    def _units_problems(self, volume: Volume, name: str, check_units: bool) -> list[str]:
        """Warnings about the input's units; an `IncompatibleInput` for a modality or quantity
        the model was not trained on, unless `check_units` is False (then a warning)."""
        refusal = _modality_refusal(volume, name) or self._quantity_refusal(volume, name)
        if refusal and check_units:
            raise IncompatibleInput(f"{refusal}; {UNITS_OVERRIDE}")
        if refusal:
            return [f"{refusal}; enhanced anyway, as check_units=False asks"]
        return self._units_warnings(volume, name)

    def _quantity_refusal(self, volume: Volume, name: str) -> str | None:
        """Why the input holds another quantity than the training data, or None. Unknown units
        cannot be judged and only warn (`_units_warnings`)."""
        trained, units = self.trained_units, volume.units
        if units in _UNCHECKED_UNITS or units == trained:
            return None
        input_is_activity = is_activity_concentration(units)
        trained_on_activity = trained in _UNCHECKED_UNITS or is_activity_concentration(trained)
        if input_is_activity and trained_on_activity:
            return None  # a constant factor: normalisation removes it
        what = (
            "an activity concentration"
            if input_is_activity
            else "not an activity concentration (a parametric or attenuation map, or relative "
            "values)"
        )
        trained_on = f"{trained} data" if trained not in _UNCHECKED_UNITS else "PET activity"
        return (
            f"{name}: the input is in {units}, {what}, but the model was trained on {trained_on} "
            f"(units in {self.workdir or 'the workdir'}/data_info.json): another quantity, "
            "unlike another unit, changes what the network sees"
        )

    def _units_warnings(self, volume: Volume, name: str) -> list[str]:
        """What the user should know about units that do not change the network's input."""
        trained, units = self.trained_units, volume.units
        if self.domain.eight_bit:
            return []  # per-slice min–max: any linear unit gives the same network input
        if self.data_info is None:
            return [
                f"{name}: the workdir has no data_info.json, so the training data's units are "
                f"unknown; accepting {units} input unchecked"
            ]
        if trained in _UNCHECKED_UNITS:
            return [
                f"{name}: the training data's units are {trained!r}; accepting {units} input "
                "unchecked"
            ]
        if units in _UNCHECKED_UNITS:
            return [
                f"{name}: the input does not state its units; the model was trained on "
                f"{trained} data, enhanced as if the input were an activity concentration"
            ]
        if units != trained:
            return [
                f"{name}: the input is in {units}, the model was trained on {trained} data; "
                "the two differ by a constant factor that per-volume normalisation removes, so "
                f"the scan is enhanced and the output stays in {units}"
            ]
        return []

    def _spacing_problems(self, volume: Volume, name: str) -> list[str]:
        """A warning when the input's pixels differ in size from the training data's by more
        than `SPACING_TOLERANCE`: the network learned structures of a size in pixels, so the same
        anatomy at another pixel size is not what it was trained to sharpen. The matrix size
        does not matter (the networks are fully convolutional)."""
        info = self.data_info or {}
        trained = info.get("pixel_spacing_mm")
        where = f"{self.workdir or 'the workdir'}/data_info.json"
        if not trained:
            if info.get("image_size") and list(volume.shape[1:]) != list(info["image_size"]):
                return [
                    f"{name}: {where} does not record the training data's pixel spacing, so "
                    f"the input's {_mm(volume.spacing[1:])} pixels cannot be checked against it"
                ]
            return []
        ratios = [s / t for s, t in zip(volume.spacing[1:], trained, strict=True)]
        if all(abs(r - 1) <= SPACING_TOLERANCE for r in ratios):
            return []
        return [
            f"{name}: pixels are {_mm(volume.spacing[1:])} but the model was trained on "
            f"{_mm(trained)} pixels ({where}); a difference over {SPACING_TOLERANCE:.0%} changes "
            "what the network sees: enhance it at the training spacing (launch/enhance.py "
            f"--resample, or petsr_jax.io.resample(volume, ({trained[0]:.4g}, {trained[1]:.4g})) "
            "first), or expect a weaker result"
        ]

    # -- the two modes ----------------------------------------------------------------------

    def fwhm_pixels(self, x, psf_fwhm_mm: float | None = None) -> float | None:
        """The scan's resolution in its own pixels, which a scanner-trained model is told: the
        PSF FWHM given (mm), else the config's `scanner.nominal_fwhm_mm` (with a warning), over
        the scan's pixel size (a Volume's, else the training data's). None for other models."""
        if not self.task.degradation.conditioned:
            return None
        if psf_fwhm_mm is None:
            psf_fwhm_mm = float(self.config.scanner.nominal_fwhm_mm)
            warnings.warn(
                f"the scan's resolution was not given; assuming a PSF of {psf_fwhm_mm:g} mm FWHM "
                "(config scanner.nominal_fwhm_mm): pass psf_fwhm_mm= / --psf_fwhm_mm= with your "
                "scanner's and reconstruction's FWHM",
                stacklevel=3,
            )
        if not psf_fwhm_mm > 0:
            raise InferenceError(f"psf_fwhm_mm must be a positive FWHM in mm, got {psf_fwhm_mm}")
        pixel_mm = (
            float(np.mean(x.spacing[1:]))
            if isinstance(x, Volume)
            else self.task.degradation.pixel_mm
        )
        return psf_fwhm_mm / pixel_mm

    def enhance_normalised(
        self, slices, *, batch_size=None, progress=None, guide=None, fwhm_px=None
    ) -> np.ndarray:
        """The network applied to `[N, H, W]` slices of volumes divided by their maximum (as
        `data.normalise` and evaluation hold them); the result in the same range. `guide` is an
        MR-guided model's `[N, H, W, C]` channels (`guide_for`); `fwhm_px` a scanner-trained
        model's input resolution (`fwhm_pixels`). The slices are one volume, in order: a 2.5D
        model takes each slice's neighbours from them."""
        self._check_channels(guide is not None)
        encoded, low, span = self.domain.encode(slices)
        context = self._context(encoded, self.task.context)
        fwhm = np.float32(0.0 if fwhm_px is None else fwhm_px)
        if self.task.degradation.conditioned and fwhm_px is None:
            raise InferenceError("a scanner-trained model needs fwhm_px (see fwhm_pixels)")
        out, *_ = _run_in_batches(
            lambda p, batch: (self._enhance(p, batch, fwhm),),
            self.params,
            encoded,
            batch_size or self.batch_size,
            progress,
            guide=guide,
            context=context,
        )
        return self.domain.decode(out, low, span)

    def reconstruct_normalised(self, slices, *, batch_size=None, progress=None, guide=None):
        """(degraded, sr) for `[N, H, W]` normalised slices of one volume: the task's
        degradation (bicubic ×scale, or a scanner's PSF and noise), then the net, in the model's
        domain and mapped back to the range of `slices`. `guide` as in `enhance_normalised`:
        the T1 is not degraded."""
        self._check_channels(guide is not None)
        encoded, low, span = self.domain.encode(slices)
        bicubic, sr = _run_in_batches(
            self._reconstruct,
            self.params,
            encoded,
            batch_size or self.batch_size,
            progress,
            guide=guide,
            context=self._context(encoded, self.task.neighbours),
        )
        return self.domain.decode(bicubic, low, span), self.domain.decode(sr, low, span)

    @staticmethod
    def _context(slices: np.ndarray, neighbours: int) -> np.ndarray | None:
        if not neighbours:
            return None
        return data.context_slices(slices, np.arange(len(slices)), neighbours)

    def _prepare(self, x, mr, check_units: bool):
        """What both modes start from: `x` checked (warnings for what cannot be), its T1
        guidance, its slices normalised per volume, and how to give results back in its kind."""
        if isinstance(x, Volume):
            for problem in self.check_input(x, mr=mr, check_units=check_units):
                warnings.warn(problem, stacklevel=3)
        guide = self.guide_for(mr, x)
        slices, rebuild = _as_slices(x)
        normalised, factor = _normalise(slices)
        return rebuild, normalised, factor, guide

    def __call__(
        self,
        x,
        *,
        mr=None,
        check_units: bool = True,
        batch_size: int | None = None,
        progress=None,
        psf_fwhm_mm: float | None = None,
    ):
        """Enhance `x` (slice, stack or Volume) at its own resolution; same kind and units.

        A Volume is checked first (`check_input`: refused when its modality or the quantity
        its units hold do not fit, unless `check_units=False`; warnings for a change of unit
        and what cannot be checked). `mr` is the T1 of `x` (same kind and grid) for a model
        trained with MR guidance, refused by any other. `psf_fwhm_mm` is the scan's resolution
        for a model trained on scanner degradations (`fwhm_pixels`). `progress(n)` is called
        after every `n` slices. Negative activity in the result is clipped to 0
        (`quantitation.clip_negative`); a Volume result counts the clipped voxels in
        `meta["clipped_voxels"]`. A model trained with `task.consistency=block` keeps the
        input's activity in every block of pixels.
        """
        rebuild, normalised, factor, guide = self._prepare(x, mr, check_units)
        out = self.enhance_normalised(
            normalised,
            batch_size=batch_size,
            progress=progress,
            guide=guide,
            fwhm_px=self.fwhm_pixels(x, psf_fwhm_mm),
        )
        return _physical(rebuild, data.denormalise(out, factor))

    def reconstruct(
        self,
        x,
        *,
        mr=None,
        check_units: bool = True,
        batch_size: int | None = None,
        progress=None,
    ) -> Reconstruction:
        """Degrade `x` by the model's scale, then recover it: `Reconstruction(bicubic, sr)`.

        Both come back in `x`'s kind and units; `bicubic` is exactly the network's input
        (`degrade` of the normalised `x`, scaled back, bicubic overshoot included); `sr` is
        clipped at 0 as in `__call__`. `mr` (not degraded) and `check_units` as in `__call__`.
        """
        rebuild, normalised, factor, guide = self._prepare(x, mr, check_units)
        bicubic, sr = self.reconstruct_normalised(
            normalised, batch_size=batch_size, progress=progress, guide=guide
        )
        return Reconstruction(
            rebuild(data.denormalise(bicubic, factor)),
            _physical(rebuild, data.denormalise(sr, factor)),
        )


def _physical(rebuild: Callable, activity: np.ndarray):
    """`activity` without negative voxels, in the caller's kind (`_as_slices`); a Volume keeps
    the number of clipped voxels in `meta["clipped_voxels"]`."""
    activity, clipped = quantitation.clip_negative(activity)
    result = rebuild(activity)
    if isinstance(result, Volume):
        result = result.replace(meta={**result.meta, "clipped_voxels": clipped})
    return result


def _training_spacing(data_info: dict | None) -> tuple[float, float, float] | None:
    """The training data's (slice, row, column) voxel size from data_info.json, or None."""
    info = data_info or {}
    if info.get("voxel_spacing_mm"):
        return tuple(float(v) for v in info["voxel_spacing_mm"])
    pixel = info.get("pixel_spacing_mm")
    return None if not pixel else (float(np.mean(pixel)), float(pixel[0]), float(pixel[1]))


def _modality_refusal(volume: Volume, name: str) -> str | None:
    """Why a DICOM series of another modality than PET cannot be enhanced by a PET model."""
    if not volume.headers:
        return None
    modality = str(volume.headers[0].get("Modality", "") or "").strip()
    if modality in ("", "PT"):
        return None
    return (
        f"{name}: the series is of modality {modality}, not PET (PT); the model learned PET "
        "images, and another modality's contrast and noise are not what it restores"
    )


def _normalise(slices: np.ndarray) -> tuple[np.ndarray, float]:
    if not np.all(np.isfinite(slices)):
        raise InferenceError("the input holds NaN or infinite values")
    try:
        return data.normalise(slices)
    except data.DataError as error:
        raise InferenceError(f"{error}: an all-zero or negative input cannot be enhanced") from None


# --------------------------------------------------------------------------------------------
# Planning outputs (launch/enhance.py)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EnhanceJob:
    """One patient of an input: where its scan is and the output paths it will get."""

    name: str
    source: Path
    dicom_dir: Path | None
    nifti_path: Path | None

    @property
    def targets(self) -> list[Path]:
        return [p for p in (self.dicom_dir, self.nifti_path) if p is not None]


def _holds_dicom_files(folder: Path) -> bool:
    """Whether DICOM files sit directly in `folder` (a series folder, not a patients root)."""
    from pydicom.misc import is_dicom

    return any(p.is_file() and is_dicom(p) for p in folder.iterdir())


def input_patients(input_path) -> dict[str, Path]:
    """Name → scan path of every scan an input holds.

    A NIfTI file or a folder with DICOM files in it is one scan, named after the file stem or
    the folder; any other folder is a patients root read as `data.list_patients` reads a data
    root (one DICOM folder or NIfTI file per patient; masks/, t1/, labels/, lesions/ skipped).
    """
    path = Path(input_path)
    if not path.exists():
        raise InferenceError(f"{path}: no such file or folder")
    if path.is_file():
        name = path.name
        for ext in (".nii.gz", ".nii"):
            if name.lower().endswith(ext):
                return {name[: -len(ext)]: path}
        raise InferenceError(
            f"{path}: not a NIfTI file (.nii / .nii.gz); for DICOM, give the series folder"
        )
    if _holds_dicom_files(path):
        return {path.resolve().name: path}
    try:
        return data.list_patients(path)
    except data.DataError as error:
        raise InferenceError(str(error)) from None


def plan_outputs(input_path, output_dir, output_format: str = "auto") -> list[EnhanceJob]:
    """The outputs of enhancing `input_path` into `output_dir`, refused before anything is done.

    Per patient: `<output_dir>/<name>/` (a DICOM series) and/or `<output_dir>/<name>.nii.gz`,
    so the output folder is itself a data root. `output_format` "auto" writes each scan in its
    input format. Refused: an output folder inside (or equal to) an input folder, an output that
    would replace an input file, and any patient output that already exists and is not empty.
    """
    if output_format not in FORMATS:
        raise InferenceError(f"format: expected one of {', '.join(FORMATS)}, got {output_format!r}")
    input_path = Path(input_path)
    output_dir = Path(output_dir)
    # A file where the output folder goes fails only at the first write, after the first scan.
    blocker = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is" if blocker == output_dir else f"lies under {blocker}, which is"
        raise InferenceError(
            f"{output_dir}: {where} a file, not a folder; give --output a new or empty folder"
        )
    patients = input_patients(input_path)
    out_resolved = output_dir.resolve()
    in_resolved = input_path.resolve()
    inside = out_resolved == in_resolved or in_resolved in out_resolved.parents
    if in_resolved.is_dir() and inside:
        raise InferenceError(
            f"{output_dir}: is inside the input {input_path}; choose an output folder outside "
            "the input so the source scans are never touched"
        )
    jobs = []
    for name, source in patients.items():
        same_as_input = "nifti" if source.is_file() else "dicom"
        wanted = output_format if output_format != "auto" else same_as_input
        want_dicom = wanted in ("dicom", "both")
        want_nifti = wanted in ("nifti", "both")
        jobs.append(
            EnhanceJob(
                name,
                source,
                output_dir / name if want_dicom else None,
                output_dir / f"{name}.nii.gz" if want_nifti else None,
            )
        )
    sources = {job.source.resolve() for job in jobs}
    problems = []
    for job in jobs:
        for target in job.targets:
            resolved = target.resolve()
            if resolved in sources or any(s in resolved.parents for s in sources if s.is_dir()):
                problems.append(f"{target} would overwrite the input {job.source}")
            elif target.is_dir() and any(target.iterdir()):
                problems.append(f"{target} already exists and is not empty")
            elif target.exists() and not target.is_dir():
                problems.append(f"{target} already exists")
    if problems:
        raise InferenceError(
            "refusing to overwrite; nothing written:\n  - "
            + "\n  - ".join(problems)
            + "\nchoose another --output or remove these first"
        )
    return jobs


def series_number(volume: Volume) -> int | None:
    """The source's SeriesNumber + 1000, so a viewer lists the derived series after it."""
    if not volume.headers:
        return None
    number = volume.headers[0].get("SeriesNumber")
    try:
        return int(number) + _SERIES_NUMBER_OFFSET
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Results a user should stop at (launch/enhance.py prints them as warnings)
# --------------------------------------------------------------------------------------------

# Relative change of an enhanced scan's total activity beyond which it is a warning.
# Super-resolution moves activity between voxels and should create none. Measured on 2026-12-04:
# the README's quick model changes the totals of its own cohort's validation and test scans by
# −2.0 to +3.0 percent (negative undershoot clipped to 0 included), and the NEMA IQ phantom,
# which it was not trained for, by +20.4 percent; 5 percent lies between the two.
TOTAL_ACTIVITY_TOLERANCE = 0.05
# The same for the maximum voxel (SUVmax), one bound each way. Sharpening raises the peaks of
# small hot structures that the scan's blur spread out (partial-volume recovery): the quick model
# raises its cohort scans' maxima by 18 to 34 percent, so more than +50 percent is beyond what it
# does to scans it fits. Sharpening should not lower the hottest voxel: beyond −10 percent the
# model flattens it.
MAX_INCREASE_TOLERANCE = 0.50
MAX_DECREASE_TOLERANCE = 0.10


def activity_warnings(change) -> list[str]:
    """What a user should stop at in a `quantitation.ActivityChange`: the total activity changed
    by more than `TOTAL_ACTIVITY_TOLERANCE`, or the maximum raised by more than
    `MAX_INCREASE_TOLERANCE` or lowered by more than `MAX_DECREASE_TOLERANCE`."""
    problems = []
    total, peak = change.total_change, change.max_change
    if abs(total) > TOTAL_ACTIVITY_TOLERANCE:
        problems.append(
            f"the output's total activity is {_signed(total)} percent against the input's (more "
            f"than {TOTAL_ACTIVITY_TOLERANCE:.0%}); super-resolution should move activity, not "
            "create or remove it: check that the scan fits the model (pixel spacing, resolution, "
            "units) before using the output for quantitation"
        )
    if peak > MAX_INCREASE_TOLERANCE or peak < -MAX_DECREASE_TOLERANCE:
        bound = MAX_INCREASE_TOLERANCE if peak > 0 else MAX_DECREASE_TOLERANCE
        problems.append(
            f"the output's maximum (SUVmax) is {_signed(peak)} percent against the input's (more "
            f"than {bound:.0%} {'up' if peak > 0 else 'down'}); read SUVmax on the input, not on "
            "the output"
        )
    return problems


def _signed(fraction: float) -> str:
    """`+20.4` / `−38.7`: a relative change in percent, with a true minus sign as in
    `ActivityChange.summary`."""
    return f"{fraction * 100:+.1f}".replace("-", "−")


def score_warnings(scores: dict) -> list[str]:
    """A model that reconstructs a scan worse than its bicubic input (PSNR or SSIM, each named)
    is worth a warning: on that scan the network removes more than it restores."""
    below = []
    for metric, unit, digits in (("psnr", " dB", 2), ("ssim", "", 3)):
        model, bicubic = scores.get(f"sr/{metric}"), scores.get(f"bicubic/{metric}")
        if model is not None and bicubic is not None and model < bicubic:
            below.append(
                f"{metric.upper()} {model:.{digits}f}{unit} against {bicubic:.{digits}f}{unit}"
            )
    if not below:
        return []
    return [
        f"the model scores below bicubic ({', '.join(below)}): on this scan it loses more than "
        "it restores; check that the scan fits the model (pixel spacing, resolution, noise) "
        "before using its output"
    ]
