"""SRCNN, the paper's first network (Sec. 3.1.1), as a Flax linen module.

It maps the bicubic-upscaled low-resolution image `lr_up` (NHWC) to the super-resolved image at
the same size, so one network serves every scale.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from petsr_jax.models.layers import ConvNetwork, convolve


class SRCNN(ConvNetwork):
    """Multi-scale SRCNN: 9×9/64 → ReLU → 1×1/32 → ReLU → 5×5/out.

    "SAME" padding equals the paper's paddings 4 / 0 / 2, which preserve the input size.
    Parameters are float32; `dtype` sets the compute dtype (bfloat16 on GPUs). `conv` is the
    convolution module class (`flax.linen.Conv` or one with its signature).
    """

    features: tuple[int, int] = (64, 32)
    out_channels: int = 1

    @nn.compact
    def __call__(self, lr_up):
        x = lr_up.astype(self.dtype)
        x = nn.relu(convolve(self, x, self.features[0], 9, "patch_extraction"))
        x = nn.relu(convolve(self, x, self.features[1], 1, "nonlinear_mapping"))
        x = convolve(self, x, self.out_channels, 5, "reconstruction")
        return x.astype(jnp.float32)
