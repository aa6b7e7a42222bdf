"""Image-quality metrics on NHWC batches, one value per image: PSNR, SSIM (`fidelity`) and
LPIPS(VGG) (`perceptual`), as the paper reports them.

    from petsr_jax import metrics
    metrics.psnr(sr, hr), metrics.ssim(sr, hr, mask), metrics.lpips(sr, hr)
"""

from petsr_jax.metrics.fidelity import SSIM_WINDOW, SSIM_WINDOWS, mse, psnr, ssim

__all__ = ["SSIM_WINDOW", "SSIM_WINDOWS", "lpips", "mse", "psnr", "ssim"]


def lpips(x, y, weights_dir: str | None = None):
    """LPIPS (VGG) per image for NHWC images in [0, 1] (see `petsr_jax.metrics.perceptual`).

    Raises `perceptual.LPIPSUnavailable`, saying why and how to provide the weights, when the
    VGG16 and linear-layer weights cannot be found. Imported on first use: the VGG network and
    its weight readers are only needed by runs that score LPIPS.
    """
    from petsr_jax.metrics import perceptual

    return perceptual.lpips(x, y, weights_dir=weights_dir)
