"""`degrade` equals PIL's bicubic resize (the authors' degradation), odd sizes included."""

import jax
import numpy as np
import pytest
from PIL import Image

from petsr_jax.data.degrade import degrade, downscale, low_res_size


def _pil_resize(img: np.ndarray, size_hw) -> np.ndarray:
    out = Image.fromarray(img.astype(np.float32), mode="F").resize(
        (size_hw[1], size_hw[0]), Image.BICUBIC
    )
    return np.asarray(out)


def _smooth_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.sin(7 * yy) * np.cos(5 * xx) + 0.3 * rng.standard_normal((h, w))
    return img.astype(np.float32)


@pytest.mark.parametrize(
    "size,scale",
    [((384, 384), 8), ((384, 384), 12), ((384, 384), 16), ((100, 90), 12), ((130, 70), 8)],
)
def test_degrade_equals_pil_bicubic_down_then_up(size, scale):
    img = _smooth_image(*size)
    lr_size = (low_res_size(size[0], scale), low_res_size(size[1], scale))
    expected = _pil_resize(_pil_resize(img, lr_size), size)
    got = np.asarray(jax.jit(degrade, static_argnums=1)(img[None, ..., None], scale))[0, ..., 0]
    assert got.shape == img.shape
    np.testing.assert_allclose(got, expected, atol=2e-4 * np.abs(img).max())


def test_downscale_shape_floors_non_divisible_sizes():
    x = np.zeros((2, 100, 90, 1), np.float32)
    assert downscale(x, 12).shape == (2, 8, 7, 1)


def test_degrade_loses_detail_and_keeps_the_mean():
    img = _smooth_image(96, 96)[None, ..., None]
    out = np.asarray(degrade(img, 8))
    assert np.abs(out - img).mean() > 0.05
    assert abs(out.mean() - img.mean()) < 0.01
