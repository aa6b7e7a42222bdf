"""`SuperResolver`: a trained network applied to slices, stacks and volumes in physical units.

Each call normalises its input the way training did (`data.normalise`: divided by the volume's
maximum; for a model of the paper's domain then each slice min–max to 8-bit levels,
`data.Domain`), runs the run's `Task` (the network, with neighbouring slices, MR guidance, a
scanner model's PSF and the activity it keeps) on batches of slices through one jitted function
(compiled once per slice shape), and maps the result back, so outputs come in the input's
units. Negative activity is clipped to 0 and counted.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from petsr_jax import data, quantitation
from petsr_jax.evaluation.predict import map_batches
from petsr_jax.inference.checks import InputChecks, as_slices
from petsr_jax.inference.errors import InferenceError
from petsr_jax.models import create_model
from petsr_jax.task import Task
from petsr_jax.volume import Volume

# DICOM SeriesDescription is a 64-character LO element.
_MAX_DESCRIPTION = 64


class Reconstruction(NamedTuple):
    """What `SuperResolver.reconstruct` returns: the degraded input and the model's recovery."""

    bicubic: np.ndarray | Volume
    sr: np.ndarray | Volume


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


class SuperResolver(InputChecks):
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

    def _prepare(self, x, mr, check_units):
        """What both modes start from: `x` checked (warnings for what cannot be), its T1
        guidance, its slices normalised per volume, and how to give results back in its kind.
        `check_units=None`: the caller has run `check_input` on `x` already."""
        if isinstance(x, Volume) and check_units is not None:
            for problem in self.check_input(x, mr=mr, check_units=check_units):
                warnings.warn(problem, stacklevel=3)
        guide = self.guide_for(mr, x)
        slices, rebuild = as_slices(x)
        normalised, factor = _normalise(slices)
        return rebuild, normalised, factor, guide

    def __call__(
        self,
        x,
        *,
        mr=None,
        check_units: bool | None = True,
        batch_size: int | None = None,
        progress=None,
        psf_fwhm_mm: float | None = None,
    ):
        """Enhance `x` (slice, stack or Volume) at its own resolution; same kind and units.

        A Volume is checked first (`check_input`: refused when its modality or the quantity
        its units hold do not fit, unless `check_units=False`; warnings for a change of unit; None
        when the caller has run `check_input` on it already
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
        check_units: bool | None = True,
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


def _normalise(slices: np.ndarray) -> tuple[np.ndarray, float]:
    if not np.all(np.isfinite(slices)):
        raise InferenceError("the input holds NaN or infinite values")
    try:
        return data.normalise(slices)
    except data.DataError as error:
        raise InferenceError(f"{error}: an all-zero or negative input cannot be enhanced") from None
