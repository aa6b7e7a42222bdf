"""The task a network is trained for: degrade → network input → output → activity kept.

One object, built from a run's config (`Task.from_config`), serves every path that puts slices
through a network — the train step, evaluation, regional recovery, figures, `petsr_jax.load`
and `launch/enhance.py` — so "the input", "the target" and "the output" cannot mean one thing
in training and another in use.

A batch is a dict of NHWC arrays, the slice to restore and what comes with it:

* `hr` `[N, H, W, 1]` — the slice, in the run's data domain (`data.Domain.encode`);
* `context` `[N, H, W, 2n]` — its `n` neighbours on each side, nearest last below it and
  nearest first above it (slice order `-n … -1, +1 … +n`), volume edges reflected
  (`data.context_slices`); present when the task needs neighbours (`Task.neighbours`);
* `guide` `[N, H, W, C]` — an MR-guided run's T1 (and coordinates), never degraded; in
  training a fraction `guide_dropout` of the images get zeros instead (`mr.dropout`);
* `lesion` `[N, H, W]` (training only, with `train.lesion_weight`) — 1 inside a lesion;
* `index` `[N]` (evaluation only) — a number per slice that fixes the random draws of a
  stochastic degradation, so a slice is scored on the same input at every evaluation.

Two degradations make the network's input from `hr`:

* `Bicubic` — the paper's: antialiased bicubic down ×scale and back up, slice by slice
  (`data.degrade`, in the run's domain). The target is `hr` itself.
* `Scanner` — what a clinical PET reconstruction gives: the activity blurred by a 3D Gaussian
  PSF whose FWHM is drawn per slice between `fwhm_min_mm` and `fwhm_max_mm` (scanners and
  reconstructions differ: 3–6 mm), plus reconstruction noise — Gaussian, its variance
  proportional to the blurred activity (Poisson-like), smoothed in-plane as OSEM noise is, at a
  level drawn per slice (`noise_min` … `noise_max`: the voxel CoV of a uniform background).
  The target is the same activity blurred by a PSF `target_ratio` times as wide, without
  noise: a finer resolution, never sharper than the data can support. The network is told the
  input's FWHM in pixels (a constant channel), so one model is right for sharp and for blurred
  scans instead of over-sharpening the sharp ones.

2.5D context (`task.context = k`): the centre slice and `k` neighbours on each side enter as
`2k + 1` channels, degraded like the centre (the scanner's blur mixes them). The degradation's
axial blur needs `margin` slices more on each side, so a batch carries `k + margin`.

Activity kept (`task.consistency = "block"`): the network's output is made non-negative and
rescaled block by block so that its activity in every `block × block` pixel block equals the
activity of the network's input there: super-resolution moves activity within a block; it
neither creates nor removes it, total activity is exact and the air stays empty. The
projection is the model's last step, in training too, so the network learns with it.

Anchored MR guidance (`mr.anchor_block = b`): the model is two networks (`models.Anchored`), a
PET-only one on the PET slices and the MR-guided one on everything; the guided output is
rescaled block by block to hold the PET-only output's activity in every `b × b` block, and both
are trained against the target. The T1 sharpens within a block; it cannot move activity into a
lesion that the PET alone does not show. With `mr.anchor_unblocked` the projection is averaged
over every offset of the block grid, so the block edges do not show in the output; measured, the
network then moves lesion activity as an unanchored one does (README, MR-guided).

Channel order of the network input: the centre slice first (DeepSR's image-level skip adds its
output to channel 0), then the neighbours, then the MR guidance, then the scanner's FWHM.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from petsr_jax.config import DEGRADATIONS
from petsr_jax.data.degrade import degrade
from petsr_jax.data.domain import PHYSICAL, Domain

# The network is told the scanner input's FWHM in pixels divided by this, so the channel lies
# near 1 (FWHMs of 1–4 pixels).
FWHM_CHANNEL_SCALE = 4.0
# Blurs are computed to this many standard deviations; the axial margin follows from it.
KERNEL_SIGMAS = 3.0
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
# The thinnest slices the cached neighbours cover (`Task.neighbours_before_data`); PET is
# reconstructed at 1.5–5 mm.
MIN_SLICE_MM = 1.0
# Stream of an image's PRNG key that draws whether its MR guidance is dropped (the key itself
# draws the degradation).
GUIDE_DROPOUT_STREAM = 1


class TaskError(ValueError):
    """A task that cannot be built from a config or applied to an input; says which field."""


def sigma_of(fwhm):
    """Gaussian standard deviation of a FWHM (same units)."""
    return fwhm / FWHM_PER_SIGMA


def gaussian_matrix(sigma, size_out: int, size_in: int, offset: int = 0):
    """`[..., size_out, size_in]` row-normalised Gaussian weights `w[i, j] ∝ exp(-(i + offset
    - j)² / 2σ²)`, one matrix per leading entry of `sigma`.

    Rows are normalised by the Gaussian's sum over the whole lattice, not over the rows'
    own entries: beyond the edges the image is zero (activity leaves the field of view, as it
    would in a scanner), and a blur never amplifies. A tiny `sigma` gives the identity.
    """
    sigma = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-3)[..., None, None]
    i = jnp.arange(size_out, dtype=jnp.float32)[:, None] + offset
    j = jnp.arange(size_in, dtype=jnp.float32)[None, :]
    lattice = jnp.arange(-64, 65, dtype=jnp.float32)
    norm = jnp.sum(jnp.exp(-(lattice**2) / (2 * sigma**2)), axis=-1, keepdims=True)
    return jnp.exp(-((i - j) ** 2) / (2 * sigma**2)) / norm


def blur(stack, sigma_xy, sigma_z=None, out_slices: int | None = None):
    """Per-image Gaussian blur of `[N, H, W, D]` slice stacks (D slices along the last axis).

    `sigma_xy` `[N]` in pixels blurs in-plane; `sigma_z` `[N]` in slices blurs along the stack
    and keeps its central `out_slices` (default all). Separable, one matrix product per axis,
    so each image has its own kernel inside one jitted call.
    """
    n, h, w, d = stack.shape
    out = jnp.einsum("nab,nbwd->nawd", gaussian_matrix(sigma_xy, h, h), stack)
    out = jnp.einsum("ncw,nawd->nacd", gaussian_matrix(sigma_xy, w, w), out)
    if sigma_z is None:
        return out
    out_slices = d if out_slices is None else out_slices
    offset = (d - out_slices) // 2
    return jnp.einsum("ned,nacd->nace", gaussian_matrix(sigma_z, out_slices, d, offset), out)


@dataclasses.dataclass(frozen=True)
class Bicubic:
    """The paper's degradation: bicubic ↓↑ ×`scale` of each slice, in the run's data domain."""

    scale: int
    domain: Domain = PHYSICAL
    margin: int = 0  # no axial blur: the network's slices are all the batch needs
    conditioned: bool = False  # the network is told nothing about its input

    def pair(self, stack, keys, out_slices: int):
        """(network input `[N, H, W, out_slices]`, target `[N, H, W, 1]`) of a stack."""
        centre = stack.shape[-1] // 2
        return degrade(stack, self.scale, self.domain), stack[..., centre : centre + 1]

    def describe(self) -> str:
        return f"bicubic ×{self.scale}"

    @property
    def label(self) -> str:
        """A few characters for progress bars and logs."""
        return f"{self.scale}x"


@dataclasses.dataclass(frozen=True)
class Scanner:
    """A scanner's 3D PSF and reconstruction noise (module docstring), in voxels of the data.

    `pixel_mm` and `slice_mm` are the training data's voxel size: the PSF is given in mm, the
    images are in voxels.
    """

    fwhm_min_mm: float
    fwhm_max_mm: float
    target_ratio: float
    noise_min: float
    noise_max: float
    noise_fwhm_px: float
    pixel_mm: float
    slice_mm: float
    domain: Domain = PHYSICAL
    conditioned: bool = True

    @property
    def margin(self) -> int:
        """Slices each side the axial blur reads beyond the network's own."""
        return int(math.ceil(KERNEL_SIGMAS * sigma_of(self.fwhm_max_mm) / self.slice_mm))

    def draw(self, keys):
        """Per-image (input FWHM in mm, noise level) from `keys` `[N]`."""

        def one(key):
            k1, k2 = jax.random.split(key)
            fwhm = jax.random.uniform(k1, (), minval=self.fwhm_min_mm, maxval=self.fwhm_max_mm)
            noise = jax.random.uniform(k2, (), minval=self.noise_min, maxval=self.noise_max)
            return fwhm, noise

        return jax.vmap(one)(keys)

    def pair(self, stack, keys, out_slices: int):
        """(noisy blurred input `[N, H, W, out_slices]`, finer noise-free target `[N, H, W, 1]`)
        and the input's FWHM in pixels `[N]`."""
        fwhm_mm, level = self.draw(keys)
        sigma_mm = sigma_of(fwhm_mm)
        blurred = blur(stack, sigma_mm / self.pixel_mm, sigma_mm / self.slice_mm, out_slices)
        target_sigma = sigma_mm * self.target_ratio
        target = blur(stack, target_sigma / self.pixel_mm, target_sigma / self.slice_mm, 1)
        noisy = blurred + self.noise(blurred, level, keys)
        return noisy, target, fwhm_mm / self.pixel_mm

    def noise(self, blurred, level, keys):
        """Reconstruction-like noise for `blurred` `[N, H, W, D]`: variance `level² · B ·
        activity` (B the image's activity-weighted mean level, so a uniform region at B has
        voxel CoV `level`), correlated in-plane over `noise_fwhm_px`."""
        n, h, w, d = blurred.shape
        white = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (h, w, d)))(keys)
        sigma = jnp.full((n,), sigma_of(self.noise_fwhm_px))
        smooth = blur(white, sigma)
        # Variance of white noise after the blur, away from the edges: Σ w² per axis.
        lattice = gaussian_matrix(sigma[:1], 1, 129, offset=64)[0, 0]
        smooth = smooth / jnp.sum(lattice**2)
        activity = jnp.maximum(blurred, 0.0)
        centre = activity[..., d // 2]
        level_b = jnp.sum(centre**2, axis=(1, 2)) / jnp.maximum(jnp.sum(centre, axis=(1, 2)), 1e-12)
        std = level[:, None, None, None] * jnp.sqrt(activity * level_b[:, None, None, None])
        return std * smooth

    label = "scanner"

    def describe(self) -> str:
        return (
            f"scanner PSF {self.fwhm_min_mm:g}–{self.fwhm_max_mm:g} mm + noise CoV "
            f"{self.noise_min:g}–{self.noise_max:g}, target {self.target_ratio:g}× the PSF"
        )


def conserve_activity(sr, reference, block: int, offset: tuple[int, int] = (0, 0)):
    """`sr` `[N, H, W, 1]` made non-negative and rescaled so that each `block × block` pixel
    block holds the activity `reference` holds there (negative reference voxels count as 0).
    The block grid starts `offset` (rows, columns) pixels before the image's corner.

    Where the network put no activity in a block that has some, the block gets the
    reference's block mean; where the reference has none, the output is 0.
    """
    n, h, w, c = sr.shape
    top, left = offset
    bottom, right = -(h + top) % block, -(w + left) % block
    rows, cols = (h + top + bottom) // block, (w + left + right) // block

    def block_sums(x):
        x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        return x.reshape(n, rows, block, cols, block, c).sum(axis=(2, 4))

    def spread(sums):
        full = jnp.repeat(jnp.repeat(sums, block, axis=1), block, axis=2)
        return full[:, top : top + h, left : left + w]

    positive = jnp.maximum(sr.astype(jnp.float32), 0.0)
    wanted = block_sums(jnp.maximum(reference.astype(jnp.float32), 0.0))
    have = block_sums(positive)
    # Pixels of each block inside the image (the padded ones hold nothing).
    count = block_sums(jnp.ones((n, h, w, c), jnp.float32))
    empty = have <= 1e-12 * jnp.maximum(wanted, 1e-30)
    ratio = jnp.where(empty, 0.0, wanted / jnp.where(empty, 1.0, have))
    fill = jnp.where(empty, wanted / jnp.maximum(count, 1.0), 0.0)
    return positive * spread(ratio) + spread(fill)


def conserve_activity_unblocked(sr, reference, block: int):
    """`conserve_activity` with the block grid at each of its `block²` offsets, averaged
    ("cycle spinning"): total activity is still exactly the reference's and activity is still
    held on the scale of a block, but no block edge is drawn into the image — a single grid's
    piecewise-constant scale factors show as a `block × block` pattern in flat regions.
    """
    shifted = [
        conserve_activity(sr, reference, block, (top, left))
        for top in range(block)
        for left in range(block)
    ]
    return sum(shifted[1:], shifted[0]) / len(shifted)


@dataclasses.dataclass(frozen=True)
class Task:
    """Degradation, 2.5D context, MR guidance and activity consistency of one run."""

    degradation: Any  # Bicubic | Scanner
    context: int = 0
    guidance: tuple[str, ...] = ()
    consistency: str = "none"
    block: int = 0
    guide_dropout: float = 0.0
    lesion_weight: float = 0.0
    anchor_block: int = 0
    anchor_unblocked: bool = False

    @classmethod
    def from_config(cls, config, spacing_mm=None) -> Task:
        """The task of a config. `spacing_mm` (slice, row, column) is the training data's voxel
        size, which a scanner degradation needs (its PSF is in mm)."""
        from petsr_jax.data import mr

        t = config.get("task", {})
        kind = t.get("degradation", "bicubic")
        domain = Domain.of(config)
        if kind == "bicubic":
            degradation = Bicubic(int(config.scale), domain)
            default_block = int(config.scale)
        elif kind == "scanner":
            if spacing_mm is None:
                raise TaskError(
                    "task.degradation=scanner needs the training data's voxel size (its PSF is "
                    "in mm); none was recorded"
                )
            s = config.scanner
            degradation = Scanner(
                fwhm_min_mm=float(s.fwhm_min_mm),
                fwhm_max_mm=float(s.fwhm_max_mm),
                target_ratio=float(s.target_ratio),
                noise_min=float(s.noise_min),
                noise_max=float(s.noise_max),
                noise_fwhm_px=float(s.noise_fwhm_px),
                pixel_mm=float(np.mean(spacing_mm[1:])),
                slice_mm=float(spacing_mm[0]),
                domain=domain,
            )
            default_block = int(s.get("block", 4))
        else:
            raise TaskError(f"task.degradation: expected one of {DEGRADATIONS}, got {kind!r}")
        return cls(
            degradation=degradation,
            context=int(t.get("context", 0)),
            guidance=mr.guidance_channels(config),
            consistency=str(t.get("consistency", "none")),
            block=int(t.get("consistency_block", 0)) or default_block,
            guide_dropout=float(config.get("mr", {}).get("dropout", 0.0)),
            lesion_weight=float(config.get("train", {}).get("lesion_weight", 0.0)),
            anchor_block=int(config.get("mr", {}).get("anchor_block", 0)),
            anchor_unblocked=bool(config.get("mr", {}).get("anchor_unblocked", False)),
        )

    # -- shapes -------------------------------------------------------------------------------

    @classmethod
    def neighbours_before_data(cls, config) -> int:
        """Neighbours each side to cache before the data's slice spacing is known: a scanner
        PSF's axial reach counted for slices of `MIN_SLICE_MM`, so every thicker slicing has
        what it needs (a few more slices than it reads; `_stack` takes the central ones)."""
        spacing = (MIN_SLICE_MM, MIN_SLICE_MM, MIN_SLICE_MM)
        return cls.from_config(config, spacing_mm=spacing).neighbours

    @property
    def neighbours(self) -> int:
        """Neighbouring slices each side a batch must carry (`context`)."""
        return self.context + self.degradation.margin

    @property
    def slab(self) -> int:
        """Slices the network sees: the centre and `context` each side."""
        return 2 * self.context + 1

    @property
    def input_channels(self) -> int:
        return self.slab + len(self.guidance) + int(self.degradation.conditioned)

    # -- the network's view ---------------------------------------------------------------------

    def _stack(self, batch, neighbours: int):
        """`[N, H, W, 2·neighbours + 1]` slices in order, from `hr` and its `context`."""
        hr = jnp.asarray(batch["hr"])
        if not neighbours:
            return hr
        context = jnp.asarray(batch["context"], hr.dtype)
        have = context.shape[-1] // 2
        if have < neighbours:
            raise TaskError(
                f"the batch carries {have} neighbours each side; {neighbours} needed (slices "
                f"thinner than {MIN_SLICE_MM:g} mm need more than the cache holds)"
            )
        below = context[..., have - neighbours : have]
        above = context[..., have : have + neighbours]
        return jnp.concatenate([below, hr, above], axis=-1)

    def _network_input(self, slab, batch, fwhm_px=None):
        """Centre first, then neighbours, MR guidance, and the scanner's FWHM channel."""
        centre = self.context
        order = [centre] + [i for i in range(self.slab) if i != centre]
        parts = [slab[..., order]]
        guide = batch.get("guide") if hasattr(batch, "get") else None
        if self.guidance:
            if guide is None:
                raise TaskError("an MR-guided task needs the batch's guidance channels")
            parts.append(jnp.asarray(guide, slab.dtype))
        if self.degradation.conditioned:
            fwhm = jnp.broadcast_to(jnp.asarray(fwhm_px, slab.dtype), slab.shape[:1])
            parts.append(
                jnp.broadcast_to(
                    fwhm[:, None, None, None] / FWHM_CHANNEL_SCALE, slab.shape[:3] + (1,)
                )
            )
        return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]

    def _finish(self, raw, lr_centre):
        """The model's last steps: the guided output anchored to the PET-only one (an
        `Anchored` model's two channels), then the activity projection when the task asks for
        it. Returns (output, the PET-only output or None)."""
        sr, pet_only = raw, None
        if self.anchor_block:
            sr, pet_only = raw[..., :1], raw[..., 1:2]
            anchor = conserve_activity_unblocked if self.anchor_unblocked else conserve_activity
            sr = anchor(sr, pet_only, self.anchor_block)
        if self.consistency == "block":
            sr = conserve_activity(sr, lr_centre, self.block)
        return sr, pet_only

    def degrade(self, batch, keys=None):
        """(network input `[N, H, W, slab]`, target `[N, H, W, 1]`, input FWHM in px or None)."""
        stack = self._stack(batch, self.neighbours)
        if keys is None:
            keys = self.eval_keys(batch, stack.shape[0])
        made = self.degradation.pair(stack, keys, self.slab)
        lr, target = made[0], made[1]
        fwhm_px = made[2] if len(made) > 2 else None
        return lr, target, fwhm_px

    def predict(self, model, params, batch, keys=None):
        """(network input's centre slice, output, target), all `[N, H, W, 1]`: the network on
        the degraded `batch` — what training fits, evaluation scores and `reconstruct` returns.
        `keys` (one PRNG key per image) draw a stochastic degradation; by default they are fixed
        by `batch["index"]`."""
        lr, target, fwhm_px = self.degrade(batch, keys)
        lr_centre, sr, _ = self._outputs(model, params, batch, lr, fwhm_px)
        return lr_centre, sr, target

    def _outputs(self, model, params, batch, lr, fwhm_px):
        """(input's centre slice, output, PET-only output or None) of the network on `lr`."""
        raw = model.apply({"params": params}, self._network_input(lr, batch, fwhm_px))
        lr_centre = lr[..., self.context : self.context + 1]
        return (lr_centre, *self._finish(raw, lr_centre))

    def enhance(self, model, params, batch, fwhm_px=None):
        """The network on the scan as it is (the paper's Fig. 5): `[N, H, W, 1]`. A scanner
        task needs the scan's FWHM in pixels."""
        if self.degradation.conditioned and fwhm_px is None:
            raise TaskError("a scanner-trained model needs the scan's resolution (PSF FWHM)")
        slab = self._stack(batch, self.context)
        raw = model.apply({"params": params}, self._network_input(slab, batch, fwhm_px))
        return self._finish(raw, jnp.asarray(batch["hr"]))[0]

    def drop_guidance(self, batch, keys):
        """`batch` with the MR guidance of a `guide_dropout` fraction of its images zeroed, one
        draw per image from its key: what training sees, so the network also learns to restore
        the PET where the anatomy says nothing."""
        if not (self.guidance and self.guide_dropout):
            return batch

        def dropped(key):
            key = jax.random.fold_in(key, GUIDE_DROPOUT_STREAM)
            return jax.random.bernoulli(key, self.guide_dropout)

        drop = jax.vmap(dropped)(keys)
        guide = jnp.asarray(batch["guide"])
        kept = jnp.where(drop[:, None, None, None], 0, guide).astype(guide.dtype)
        return {**batch, "guide": kept}

    def loss(self, model, params, batch, keys):
        """MSE between the output for the degraded batch (its guidance dropped as configured)
        and its target; with `lesion_weight`, lesion pixels (`batch["lesion"]`) weigh
        1 + lesion_weight and the sum is divided by the total weight."""
        batch = self.drop_guidance(batch, keys)
        lr, target, fwhm_px = self.degrade(batch, keys)
        _, sr, pet_only = self._outputs(model, params, batch, lr, fwhm_px)
        loss = self._mse(sr, target, batch)
        if pet_only is not None:  # the anchor is trained as a PET-only network in its own right
            loss = loss + self._mse(pet_only, target, batch)
        return loss

    def _mse(self, sr, target, batch):
        """Mean squared error, lesion pixels weighted `1 + lesion_weight`."""
        squared = jnp.square(sr - target)
        if not self.lesion_weight:
            return jnp.mean(squared)
        if "lesion" not in batch:
            raise TaskError("a lesion-weighted loss needs the batch's lesion maps")
        weight = 1.0 + self.lesion_weight * jnp.asarray(batch["lesion"], squared.dtype)[..., None]
        return jnp.sum(weight * squared) / jnp.sum(weight)

    @staticmethod
    def eval_keys(batch, n: int):
        """One fixed key per image, from `batch["index"]` when present: the same slice gets the
        same degradation at every evaluation and in every batch layout."""
        base = jax.random.key(0)
        index = batch.get("index") if hasattr(batch, "get") else None
        index = jnp.arange(n) if index is None else jnp.asarray(index).reshape(n)
        return jax.vmap(lambda i: jax.random.fold_in(base, i))(index)

    def describe(self) -> str:
        parts = [self.degradation.describe()]
        if self.context:
            parts.append(f"2.5D ({self.slab} slices)")
        if self.guidance:
            dropped = self.guide_dropout and f", guidance dropped for {self.guide_dropout:.0%}"
            parts.append("MR-guided" + (dropped or ""))
        if self.consistency == "block":
            parts.append(f"activity kept per {self.block}×{self.block} block")
        if self.lesion_weight:
            parts.append(f"lesion pixels weighted {1 + self.lesion_weight:g}× in the loss")
        if self.anchor_block:
            grid = " at every grid offset, averaged" if self.anchor_unblocked else ""
            parts.append(
                f"guided output anchored to a PET-only network per {self.anchor_block}×"
                f"{self.anchor_block} block{grid}"
            )
        return ", ".join(parts)
