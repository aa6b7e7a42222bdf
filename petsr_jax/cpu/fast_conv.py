"""A stride-1 "SAME" convolution with bias whose backward pass is cheaper on XLA:CPU.

`Conv` is a drop-in for the `flax.linen.Conv` the networks use (same call, same `kernel`/`bias`
parameters, shapes, initialisers and dtype handling, so checkpoints and parameter trees are
unchanged); only how the backward pass is written differs, through `conv2d_same`'s custom VJP:

* bias gradient — autodiff reduces the `[N, H, W, C]` output gradient over three leading axes,
  which XLA:CPU lowers to a windowed reduction about 8× slower than needed (1.8 ms against
  0.2 ms at 16×48×48×64). Here the gradient is viewed as `[rows, k·C]` (a free reshape) and
  summed over rows, then over the `k` groups: one vectorised pass, and shorter sums that are at
  least as accurate.
* input gradient — a "SAME" convolution of the output gradient with the spatially flipped,
  in/out-swapped kernel: exactly the transposed convolution for odd kernels and stride 1.
* kernel gradient — XLA's own convolution, whose Eigen kernel (~150 GFLOP/s here at 16 images,
  transposes included) beat every reformulation measured on this 2-core AVX-512 CPU: im2col +
  matmul (XLA builds the patch matrix at ~1.5 GB/s), batch folded into height (4× slower),
  Winograd F(4×4, 3×3) written in XLA ops (1.7e-6 relative error, but 7–21 % more CPU time than
  Eigen for each of the three convolutions, its tile transforms being memory-bound fusions).
  Eigen contracts over the batch innermost, so batches under 8 images are first cut into row
  strips that act as extra images (`kernel_gradient`): 20 % faster at 4×96×96, 3× at 1×128×128.

The DeepSR train step gains about 2 % at 16×48×48 and more at small batches (the convolutions
themselves are ~95 % of it). The maths is unchanged; gradients agree with `jax.grad` of the
plain convolution to float32 rounding (`tests/test_fast_conv.py`). On GPUs XLA's autodiff is
cuDNN-backed and fast, so `model.conv="auto"` takes this path only on one CPU device, and there
only where the faster oneDNN path (`petsr_jax.cpu.onednn`, whose `Conv` extends this one) is
unavailable.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")

# Rows of this many pixels are summed together in the bias gradient; 8 × 64 channels = 512
# floats, a few vector registers wide (measured best of 2–32 at 16×48×48×64).
_BIAS_GROUP = 8


# The kernel gradient contracts over batch × pixels, with the batch as Eigen's innermost
# "feature" depth; below this many images that depth starves its inner loop (4×96×96: 112
# against 135 GFLOP/s, 1×128×128: 41 against 137), so small batches are cut into row strips.
_MIN_GRADIENT_BATCH = 8


def _conv(x: jax.Array, kernel: jax.Array, padding="SAME") -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_DIMENSIONS)


def kernel_gradient(x: jax.Array, g: jax.Array, kernel_shape) -> jax.Array:
    """d(sum(g · conv(x, k)))/dk for a "SAME" stride-1 convolution with kernel `kernel_shape`.

    With fewer than `_MIN_GRADIENT_BATCH` images, each image is cut into `strips` row bands
    (each with the kernel's halo of input rows) that act as extra images: the same sum over
    every output pixel, regrouped so the contraction is deeper. Rows added to make the height
    divisible carry a zero gradient and change nothing.
    """
    n, h, w, _ = x.shape
    kh, kw = kernel_shape[:2]
    zero_kernel = jnp.zeros(kernel_shape, x.dtype)
    strips = min(-(-_MIN_GRADIENT_BATCH // n), h)
    if strips == 1:
        return jax.vjp(lambda k: _conv(x, k), zero_kernel)[1](g)[0]
    band = -(-h // strips)
    extra = band * strips - h
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2 + extra), (kw // 2, kw // 2), (0, 0)))
    bands = jnp.stack([xp[:, i * band : i * band + band + kh - 1] for i in range(strips)], axis=1)
    bands = bands.reshape(n * strips, band + kh - 1, w + kw - 1, x.shape[-1])
    g_bands = jnp.pad(g, ((0, 0), (0, extra), (0, 0), (0, 0))).reshape(
        n * strips, band, w, g.shape[-1]
    )
    return jax.vjp(lambda k: _conv(bands, k, "VALID"), zero_kernel)[1](g_bands)[0]


def bias_gradient(g: jax.Array) -> jax.Array:
    """Sum of an NHWC gradient over N, H, W, as one reduction over a `[rows, k·C]` view."""
    channels = g.shape[-1]
    pixels = g.size // channels
    group = _BIAS_GROUP if pixels % _BIAS_GROUP == 0 else 1
    wide = g.reshape(pixels // group, group * channels)
    return wide.sum(axis=0, dtype=jnp.float32).reshape(group, channels).sum(axis=0)


@jax.custom_vjp
def conv2d_same(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """`conv(x, kernel) + bias`: NHWC input, HWIO kernel with odd sides, stride 1, "SAME"."""
    return _conv(x, kernel) + bias


def _conv2d_same_fwd(x, kernel, bias):
    return conv2d_same(x, kernel, bias), (x, kernel)


def _conv2d_same_bwd(residuals, g):
    x, kernel = residuals
    flipped = jnp.flip(kernel, axis=(0, 1)).swapaxes(2, 3)
    dx = _conv(g, flipped)
    dkernel = kernel_gradient(x, g, kernel.shape)
    dbias = bias_gradient(g).astype(g.dtype)
    return dx, dkernel, dbias


conv2d_same.defvjp(_conv2d_same_fwd, _conv2d_same_bwd)


class Conv(nn.Module):
    """`flax.linen.Conv(features, kernel_size, padding="SAME")` computed by `conv2d_same`.

    Parameters, their names, shapes, initialisers and dtype promotion match `nn.Conv`, so a
    network built with either holds identical parameters for the same RNG.
    """

    features: int
    kernel_size: tuple[int, int]
    padding: str = "SAME"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    def convolve(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
        """`conv(x, kernel) + bias`; subclasses compute it elsewhere."""
        return conv2d_same(x, kernel, bias)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        if self.padding != "SAME" or kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(
                f"{type(self).__name__} computes stride-1 'SAME' convolutions with odd kernel "
                f"sides, got padding={self.padding!r}, kernel_size={(kh, kw)}"
            )
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return self.convolve(x, kernel, bias)
