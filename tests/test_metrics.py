"""PSNR and SSIM against scikit-image."""

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from petsr_jax import metrics


def _pair(seed=0, shape=(3, 40, 48, 1)):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, shape).astype(np.float32)
    y = np.clip(x + 0.1 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    return x, y


def test_psnr_matches_scikit_image():
    x, y = _pair()
    got = np.asarray(metrics.psnr(x, y))
    expected = [peak_signal_noise_ratio(y[i, ..., 0], x[i, ..., 0], data_range=1) for i in range(3)]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_ssim_matches_scikit_image_gaussian_window():
    x, y = _pair(1)
    got = np.asarray(metrics.ssim(x, y))
    expected = [
        structural_similarity(
            x[i, ..., 0],
            y[i, ..., 0],
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        for i in range(3)
    ]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_masked_metrics_only_look_inside_the_mask():
    x, y = _pair(2)
    mask = np.zeros_like(x, bool)
    mask[:, 10:30, 12:40] = True
    y_out = y.copy()
    y_out[~mask] = 0.0  # change only outside the mask
    np.testing.assert_allclose(metrics.psnr(x, y, mask), metrics.psnr(x, y_out, mask), rtol=1e-6)
    sq = (x - y) ** 2
    expected = [10 * np.log10(1 / sq[i][mask[i]].mean()) for i in range(3)]
    np.testing.assert_allclose(metrics.psnr(x, y, mask), expected, rtol=1e-5)
    # SSIM inside the mask: skimage's full map, averaged over the masked pixels the window fits.
    _, smap = structural_similarity(
        x[0, ..., 0],
        y[0, ..., 0],
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        full=True,
    )
    inner = mask[0, 5:-5, 5:-5, 0]
    np.testing.assert_allclose(
        metrics.ssim(x, y, mask)[0], smap[5:-5, 5:-5][inner].mean(), atol=1e-5
    )


def test_uniform_window_ssim_is_scikit_image_default():
    # The paper's evaluation: structural_similarity(x, y, data_range=1), nothing else set.
    x, y = _pair(3)
    got = np.asarray(metrics.ssim(x, y, window="uniform"))
    expected = [structural_similarity(x[i, ..., 0], y[i, ..., 0], data_range=1) for i in range(3)]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # ... on smooth, image-like 8-bit content too, where the two windows differ.
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    hr = np.round(255 * np.exp(-((yy - 0.5) ** 2 + (xx - 0.4) ** 2) / 0.05)) / 255
    lr = np.round(255 * np.exp(-((yy - 0.5) ** 2 + (xx - 0.42) ** 2) / 0.06)) / 255
    pair = [a[None, ..., None].astype(np.float32) for a in (lr, hr)]
    uniform = float(metrics.ssim(*pair, window="uniform")[0])
    assert abs(uniform - structural_similarity(lr, hr, data_range=1)) < 1e-4
    assert abs(uniform - float(metrics.ssim(*pair)[0])) > 1e-3


def test_masked_uniform_ssim_averages_the_map_inside_the_mask():
    x, y = _pair(4)
    mask = np.zeros_like(x, bool)
    mask[:, 8:30, 10:40] = True
    _, smap = structural_similarity(x[0, ..., 0], y[0, ..., 0], data_range=1.0, full=True)
    inner = mask[0, 3:-3, 3:-3, 0]
    got = metrics.ssim(x, y, mask, window="uniform")[0]
    np.testing.assert_allclose(got, smap[3:-3, 3:-3][inner].mean(), atol=1e-4)
