"""Intensities: per-volume normalisation and the network's data domain.

Each volume is divided by its own maximum (`normalise`), so every slice lies in [0, 1] and the
factor, kept per slice, maps outputs back to physical units (`denormalise`). What the network
then sees is the run's `Domain` (config `data.domain`, `Domain.of`): those slices as they are
(`PHYSICAL`), or each slice min–max scaled to 8-bit levels as the paper's authors did (`PAPER`),
`encode`d and `decode`d per slice. The name is a string in the config only; the code passes the
object and asks it what it is (`eight_bit`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from petsr_jax.data.patients import DataError


def normalise(data: np.ndarray) -> tuple[np.ndarray, float]:
    """`data / max(data)` and the factor: per-volume scaling into [0, 1], inverted by
    `denormalise`. Negative values (reconstruction undershoot) are kept, not clipped."""
    scale = float(np.max(data))
    if not np.isfinite(scale) or scale <= 0:
        raise DataError(f"cannot normalise a volume whose maximum is {scale}")
    return (data / scale).astype(np.float32), scale


def denormalise(normalised: np.ndarray, scale: float) -> np.ndarray:
    """Back to physical units: the inverse of `normalise`."""
    return np.asarray(normalised, np.float32) * np.float32(scale)


DOMAINS = ("physical", "paper")


@dataclasses.dataclass(frozen=True)
class Domain:
    """How a run's slices are encoded for its network (`data.domain`)."""

    name: str = "physical"

    def __post_init__(self):
        if self.name not in DOMAINS:
            raise ValueError(f"data.domain: expected one of {DOMAINS}, got {self.name!r}")

    @classmethod
    def of(cls, source) -> Domain:
        """The domain of a config (`data.domain`, "physical" where a config predates it), of a
        name, or a Domain itself."""
        if isinstance(source, Domain):
            return source
        if isinstance(source, str):
            return cls(source)
        return cls(str(source.data.get("domain", "physical")))

    @property
    def eight_bit(self) -> bool:
        """Slices held as 8-bit levels / 255 (the paper's), resized as PIL resizes them."""
        return self.name == "paper"

    def encode(self, slices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`[N, H, W]` slices (any units) in this domain, and the per-slice `(low, span)` that
        `decode` inverts with: `slices ≈ low + span · encoded`.

        * physical: unchanged (`low` 0, `span` 1); the caller has divided each volume by its
          maximum (`normalise`), which keeps the relative activity of slices and patients.
        * paper: each slice min–max scaled to the 256 levels of an 8-bit image, divided by 255,
          as the authors' preprocessing did (`floor((x − min) · 256 / (max − min))` stored as
          uint8) — except that their brightest pixel, 256, overflowed to 0 and is 255 here. A
          constant slice becomes zeros. Per-slice scaling discards each slice's intensity, so a
          scan in any linear unit gives the same network input.
        """
        slices = np.asarray(slices, np.float32)
        count = slices.shape[0]
        if not self.eight_bit:
            return slices, np.zeros(count, np.float32), np.ones(count, np.float32)
        low = slices.reshape(count, -1).min(axis=1) if count else np.zeros(0, np.float32)
        high = slices.reshape(count, -1).max(axis=1) if count else np.zeros(0, np.float32)
        span = (high - low).astype(np.float32)
        safe = np.where(span > 0, span, 1.0)[:, None, None]
        levels = np.floor((slices - low[:, None, None]) * (256.0 / safe))
        levels = np.where(span[:, None, None] > 0, np.clip(levels, 0, 255), 0)
        # Level k holds the values in [k, k + 1) · span / 256; k / 255 · span is within half a
        # level of that band's middle for every k, so `decode` maps level 255 back to `high`.
        return (levels / 255.0).astype(np.float32), low.astype(np.float32), span

    @staticmethod
    def decode(encoded: np.ndarray, low: np.ndarray, span: np.ndarray) -> np.ndarray:
        """Slices back from the domain: `low + span · encoded`, per slice (`encode`)."""
        encoded = np.asarray(encoded, np.float32)
        shape = (-1,) + (1,) * (encoded.ndim - 1)
        return (
            np.asarray(low, np.float32).reshape(shape)
            + np.asarray(span, np.float32).reshape(shape) * encoded
        )


PHYSICAL = Domain("physical")
PAPER = Domain("paper")
