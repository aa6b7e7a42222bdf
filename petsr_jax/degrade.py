"""The one definition of "N× bicubic" used by training, evaluation, reports and enhancement.

`degrade(hr, scale)` simulates the paper's low-resolution input: antialiased bicubic
downscaling by `scale`, then bicubic upscaling back to the original size. It is a pure `jnp`
function, so it runs on the accelerator inside the jitted train step: the data loader only ever
moves high-resolution slices.

`jax.image.resize(..., "bicubic", antialias=True)` uses the Keys cubic (a = -0.5) with the kernel
widened by the scale factor when downsampling, which is what PIL's `Image.resize(..., BICUBIC)`
(the authors' code) does; the equality is asserted against PIL in `tests/test_degrade.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def degrade(hr: jax.Array, scale: int) -> jax.Array:
    """Bicubic-degraded input `lr_up` for high-resolution NHWC images `hr`.

    Downscale by `scale` (antialiased bicubic), then bicubic-upscale back to `hr`'s size, so the
    network input and the target share a pixel grid (the paper's Sec. 3.1). `scale` must be a
    Python int (it sets array shapes); `scale=1` returns `hr` unchanged.
    """
    if hr.ndim != 4:
        raise ValueError(f"degrade expects NHWC images, got shape {hr.shape}")
    if scale == 1:
        return hr
    hr = jnp.asarray(hr)
    return upscale(downscale(hr, scale), hr.shape[1:3]).astype(hr.dtype)
