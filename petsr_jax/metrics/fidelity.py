"""Fidelity to the original on NHWC batches, one value per image: MSE, PSNR, SSIM.

Images are in the network's range: each volume divided by its own maximum (see
`petsr_jax.data.normalise`), so the data range is 1. PSNR and SSIM are DeepMind's dm-pix
implementations; SSIM's default window is the Gaussian 11×11, σ = 1.5 of Wang et al. (2004), which
equals scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)`. `window="uniform"` is scikit-image's *default*
instead — a 7×7 box with the sample covariance, `structural_similarity(x, y, data_range=1)` —
which is what the paper's authors scored with: on 8× bicubic slices it reads about 0.02 higher
than the Gaussian window, as much as the gaps the paper reports (both checked against scikit-image
in `tests/test_metrics.py`).

Masked variants restrict the average to a region (the brain): PSNR over the masked pixels, SSIM
as the mean of the SSIM map over the masked pixels the 11×11 window fits around.

The paper's 8-bit images are made by `petsr_jax.data.to_domain` and `petsr_jax.data.degrade`; the
"paper" domain of `petsr_jax.evaluation.evaluate` scores them /255 with `psnr` and
`ssim(window="uniform")`.
"""

from __future__ import annotations

import dm_pix
import jax.numpy as jnp
from jax import lax

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
# scikit-image's default SSIM window: 7×7 uniform, sample (N − 1) covariance.
SSIM_UNIFORM_WINDOW = 7
SSIM_WINDOWS = ("gaussian", "uniform")
_K1, _K2 = 0.01, 0.03


def mse(x, y, mask=None):
    """Mean squared error per image, over `mask` where given."""
    err = jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32))
    if mask is None:
        return jnp.mean(err, axis=(1, 2, 3))
    mask = jnp.broadcast_to(mask, err.shape).astype(jnp.float32)
    return jnp.sum(err * mask, axis=(1, 2, 3)) / jnp.maximum(jnp.sum(mask, axis=(1, 2, 3)), 1.0)


def psnr(x, y, mask=None, data_range: float = 1.0):
    """Peak signal-to-noise ratio in dB per image (`data_range` = 1 for normalised images)."""
    if mask is None and data_range == 1.0:
        return dm_pix.psnr(x.astype(jnp.float32), y.astype(jnp.float32))
    return 10.0 * jnp.log10(data_range**2 / mse(x, y, mask))


def _box_mean(images, size: int):
    """Mean over every `size`×`size` window of NHWC images ("VALID": where the window fits)."""
    window = (1, size, size, 1)
    total = lax.reduce_window(images, 0.0, lax.add, window, (1, 1, 1, 1), "VALID")
    return total / (size * size)


def _uniform_ssim_map(x, y, data_range: float):
    """scikit-image's default SSIM map (7×7 box, sample covariance), where the window fits."""
    size = SSIM_UNIFORM_WINDOW
    n = size * size
    mean_x, mean_y = _box_mean(x, size), _box_mean(y, size)
    # Sample covariances: E[xy] − E[x]E[y], scaled by N / (N − 1) as scikit-image does.
    unbias = n / (n - 1)
    var_x = unbias * (_box_mean(x * x, size) - mean_x * mean_x)
    var_y = unbias * (_box_mean(y * y, size) - mean_y * mean_y)
    cov = unbias * (_box_mean(x * y, size) - mean_x * mean_y)
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    return ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / (
        (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    )


def ssim(x, y, mask=None, data_range: float = 1.0, window: str = "gaussian"):
    """Structural similarity per image (K1 = 0.01, K2 = 0.03).

    `window="gaussian"`: 11×11, σ = 1.5 (Wang et al.); `"uniform"`: scikit-image's default 7×7
    box with sample covariance (the paper's evaluation). The map is averaged where the window
    fits, as scikit-image crops its border.
    """
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    if window == "gaussian":
        size = SSIM_WINDOW
        ssim_map = dm_pix.ssim(
            x, y, max_val=data_range, filter_size=size, filter_sigma=SSIM_SIGMA, return_map=True
        )
    elif window == "uniform":
        size = SSIM_UNIFORM_WINDOW
        ssim_map = _uniform_ssim_map(x, y, data_range)
    else:
        raise ValueError(f"SSIM window: expected one of {SSIM_WINDOWS}, got {window!r}")
    if mask is None:
        return jnp.mean(ssim_map, axis=(1, 2, 3))
    pad = size // 2
    inner = jnp.broadcast_to(mask, x.shape)[:, pad:-pad, pad:-pad, :].astype(jnp.float32)
    return jnp.sum(ssim_map * inner, axis=(1, 2, 3)) / jnp.maximum(
        jnp.sum(inner, axis=(1, 2, 3)), 1.0
    )
