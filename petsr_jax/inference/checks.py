"""A scan checked against the model before anything is computed.

Refused (`IncompatibleInput`, naming the input): a missing, unneeded or misaligned T1; another
modality than PET; units that hold another quantity than the training data's (a parametric or
attenuation map), unless the caller accepts it (`check_units=False`, `--allow_units`).
Warned about (returned as lines): a change of activity unit (normalisation removes it), units
that cannot be judged, pixels more than `SPACING_TOLERANCE` off the training data's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from petsr_jax import data
from petsr_jax.data import mr as mr_guidance
from petsr_jax.inference.errors import IncompatibleInput, InferenceError
from petsr_jax.io.geometry import affine_in
from petsr_jax.io.units import is_activity_concentration
from petsr_jax.volume import Volume

# Units that say nothing about the data; a model trained on them is not checked against inputs.
_UNCHECKED_UNITS = frozenset({"unknown", "mixed", "", None})


# How a user accepts an input the unit checks refuse, named in every such refusal.
UNITS_OVERRIDE = (
    "if you know the scan fits the model, enhance it anyway with "
    "sr(volume, check_units=False) or launch/enhance.py --allow_units"
)


# Relative difference in pixel spacing from the training data above which enhancement warns.
SPACING_TOLERANCE = 0.10


def _mm(spacing) -> str:
    """`2.03 × 2.03 mm`: an in-plane (row, column) pixel spacing for a message."""
    return f"{spacing[0]:.3g} × {spacing[1]:.3g} mm"


def as_slices(x) -> tuple[np.ndarray, Callable]:
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


class InputChecks:
    """`SuperResolver`'s checks of an input before anything is computed: channels and the T1,
    modality, the quantity and units, the pixel spacing. Each refusal is an `IncompatibleInput`
    naming the input; what cannot be judged is a warning returned to the caller."""

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
        t1_slices, _ = as_slices(t1)
        pet_slices, _ = as_slices(like)
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
