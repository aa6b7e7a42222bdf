"""DeepSR, the paper's deep residual network (Sec. 3.1.2), as Flax linen modules.

Like SRCNN it maps `lr_up` (NHWC) to the super-resolved image at the same size. `residual_scale`
multiplies each residual block's branch before it is added (EDSR's 0.1 for very wide networks);
1.0, the paper's network, leaves it out.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from petsr_jax.models.layers import ConvNetwork, convolve


class ResidualBlock(ConvNetwork):
    """conv 3×3 → ReLU → conv 3×3, with a skip around it (EDSR-style, no normalisation)."""

    width: int = 64
    residual_scale: float = 1.0

    @nn.compact
    def __call__(self, h):
        inner = nn.relu(convolve(self, h, self.width, 3, "conv1"))
        branch = convolve(self, inner, self.width, 3, "conv2")
        if self.residual_scale != 1.0:
            branch = branch * jnp.asarray(self.residual_scale, branch.dtype)
        return h + branch


class DeepSR(ConvNetwork):
    """conv 3×3/width, `num_blocks` residual blocks, conv 3×3/out.

    `global_skip` picks where the long skip sits:
      * `"image"` — output = input + network(input), the paper's text (predict only the detail);
      * `"feature"` — output = conv_out(blocks(h) + h) with h = conv_in(input), as the authors'
        released code does.
    With `global_skip="image"` the first `out_channels` input channels are the image the residual
    is added to (extra channels, e.g. an MR prior, only feed the network).
    `remat=True` recomputes each block's activations in the backward pass, trading compute for
    memory on large 384² batches. Parameters are float32; `dtype` sets the compute dtype.
    """

    num_blocks: int = 20
    width: int = 64
    out_channels: int = 1
    global_skip: str = "feature"
    remat: bool = False
    residual_scale: float = 1.0

    @nn.compact
    def __call__(self, lr_up):
        if self.global_skip not in ("image", "feature"):
            raise ValueError(f"global_skip must be 'image' or 'feature', got {self.global_skip!r}")

        block = nn.remat(ResidualBlock) if self.remat else ResidualBlock
        x = lr_up.astype(self.dtype)
        h0 = convolve(self, x, self.width, 3, "conv_in")
        h = h0
        for i in range(self.num_blocks):
            h = block(
                width=self.width,
                dtype=self.dtype,
                conv=self.conv,
                initialization=self.initialization,
                residual_scale=self.residual_scale,
                name=f"block_{i}",
            )(h)
        if self.global_skip == "feature":
            h = h + h0
        out = convolve(self, h, self.out_channels, 3, "conv_out").astype(jnp.float32)
        if self.global_skip == "image":
            out = out + lr_up[..., : self.out_channels].astype(jnp.float32)
        return out
