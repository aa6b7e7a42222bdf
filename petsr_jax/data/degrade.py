"""The one definition of "N× bicubic" used by training, evaluation, reports and enhancement.

`degrade(hr, scale)` simulates the paper's low-resolution input: antialiased bicubic
downscaling by `scale`, then bicubic upscaling back to the original size. It is a pure `jnp`
function, so it runs on the accelerator inside the jitted train step: the data loader only ever
moves high-resolution slices.

`jax.image.resize(..., "bicubic", antialias=True)` uses the Keys cubic (a = -0.5) with the kernel
widened by the scale factor when downsampling, which is what PIL's `Image.resize(..., BICUBIC)`
(the authors' code) does; the equality is asserted against PIL in `tests/test_degrade.py`.

In the paper's domain (`data.PAPER`, slices held as 8-bit levels / 255, see
`petsr_jax.data.Domain`) the authors resized 8-bit PIL images, which store every resampling
pass as uint8: `degrade(hr, scale, PAPER)` rounds after each pass as PIL does
(`resize_8bit`), so the network input is exactly the image their code fed it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from petsr_jax.data.domain import PHYSICAL, Domain


def low_res_size(size: int, scale: int) -> int:
    """Side of the low-resolution image: `floor(size / scale)`, at least 1.

    Sizes not divisible by the scale are floored, as `PIL.Image.resize((w // s, h // s))` does in
    the authors' code; the upscale then returns exactly to `size`, so the effective scale of that
    axis is `size / floor(size / scale)` (e.g. 100 px at 12× → 8 px, an effective 12.5×).
    """
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    return max(1, size // scale)


def downscale(hr: jax.Array, scale: int) -> jax.Array:
    """Antialiased bicubic downscaling of NHWC images by an integer `scale`."""
    n, h, w, c = hr.shape
    shape = (n, low_res_size(h, scale), low_res_size(w, scale), c)
    return jax.image.resize(hr, shape, method="bicubic", antialias=True)


def upscale(lr: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bicubic upscaling of NHWC images to `size = (H, W)`."""
    n, _, _, c = lr.shape
    return jax.image.resize(lr, (n, size[0], size[1], c), method="bicubic", antialias=True)


def round_to_8bit(x):
    """Round half up and clip to 0..255, as PIL stores every resampling pass of an 'L' image.

    PIL accumulates in fixed point starting from one half and shifts down (`floor(x + 0.5)`),
    then clips to the uint8 range; values stay float32 so they can go on through JAX.
    """
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def resize_8bit(images, size: tuple[int, int]):
    """NHWC 8-bit images (float32 holding 0..255) resized as PIL resizes an 'L' image.

    PIL's bicubic resampler makes two passes, columns (width) first, and stores each pass as
    uint8 (rounded half up, clipped), so an 8-bit resize is not the float resize rounded once.
    Each pass here is `jax.image.resize` along one axis, which equals PIL on floats, followed by
    the same rounding. PIL's 22-bit fixed-point coefficients can still move a value that lands
    within ~1e-4 of a half by one grey level.
    """
    n, h, w, c = images.shape
    out = images
    if size[1] != w:
        out = round_to_8bit(
            jax.image.resize(out, (n, h, size[1], c), method="bicubic", antialias=True)
        )
    if size[0] != h:
        out = round_to_8bit(
            jax.image.resize(out, (n, size[0], size[1], c), method="bicubic", antialias=True)
        )
    return out


def degrade_8bit(hr8, scale: int):
    """The authors' degradation of 8-bit images (0..255): PIL bicubic down ×scale, back up."""
    _, h, w, _ = hr8.shape
    if scale == 1:
        return hr8
    low = resize_8bit(hr8, (low_res_size(h, scale), low_res_size(w, scale)))
    return resize_8bit(low, (h, w))


def degrade(hr: jax.Array, scale: int, domain: Domain = PHYSICAL) -> jax.Array:
    """Bicubic-degraded input `lr_up` for high-resolution NHWC images `hr`.

    Downscale by `scale` (antialiased bicubic), then bicubic-upscale back to `hr`'s size, so the
    network input and the target share a pixel grid (the paper's Sec. 3.1). `scale` must be a
    Python int (it sets array shapes); `scale=1` returns `hr` unchanged. With
    an eight-bit domain (`PAPER`), `hr` holds 8-bit levels / 255 and each pass is stored as 8
    bits.
    """
    if hr.ndim != 4:
        raise ValueError(f"degrade expects NHWC images, got shape {hr.shape}")
    if scale == 1:
        return hr
    hr = jnp.asarray(hr)
    if domain.eight_bit:
        return (degrade_8bit(hr.astype(jnp.float32) * 255.0, scale) / 255.0).astype(hr.dtype)
    return upscale(downscale(hr, scale), hr.shape[1:3]).astype(hr.dtype)


def store_8bit(sr):
    """A network output in the paper's domain as the authors stored it: ×255, clipped to
    0..255, truncated to uint8 (`astype('uint8')`), / 255 — the image their metrics read."""
    return jnp.floor(jnp.clip(sr.astype(jnp.float32) * 255.0, 0.0, 255.0)) / 255.0
