"""The two super-resolution networks of the paper, as Flax linen modules.

Both map the bicubic-upscaled low-resolution image `lr_up` (NHWC) to the super-resolved image at
the same size, so one network serves every scale. Parameters are float32; `dtype` sets the
compute dtype (bfloat16 on GPUs).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class SRCNN(nn.Module):
    """Multi-scale SRCNN (paper Sec. 3.1.1): 9×9/64 → ReLU → 1×1/32 → ReLU → 5×5/out.

    "SAME" padding equals the paper's paddings 4 / 0 / 2, which preserve the input size.
    """

    features: tuple[int, int] = (64, 32)
    out_channels: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, lr_up):
        conv = lambda f, k, name: nn.Conv(  # noqa: E731
            f, (k, k), padding="SAME", dtype=self.dtype, param_dtype=jnp.float32, name=name
        )
        x = lr_up.astype(self.dtype)
        x = nn.relu(conv(self.features[0], 9, "patch_extraction")(x))
        x = nn.relu(conv(self.features[1], 1, "nonlinear_mapping")(x))
        x = conv(self.out_channels, 5, "reconstruction")(x)
        return x.astype(jnp.float32)


class ResidualBlock(nn.Module):
    """conv 3×3 → ReLU → conv 3×3, with a skip around it (EDSR-style, no normalisation)."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        conv = lambda name: nn.Conv(  # noqa: E731
            self.width, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=jnp.float32,
            name=name,
        )
        return h + conv("conv2")(nn.relu(conv("conv1")(h)))


class DeepSR(nn.Module):
    """DeepSR (paper Sec. 3.1.2): conv 3×3/width, `num_blocks` residual blocks, conv 3×3/out.

    `global_skip` picks where the long skip sits:
      * `"image"` — output = input + network(input), the paper's text (predict only the detail);
      * `"feature"` — output = conv_out(blocks(h) + h) with h = conv_in(input), as the authors'
        released code does.
    With `global_skip="image"` the first `out_channels` input channels are the image the residual
    is added to (extra channels, e.g. an MR prior, only feed the network).
    `remat=True` recomputes each block's activations in the backward pass, trading compute for
    memory on large 384² batches.
    """

    num_blocks: int = 20
    width: int = 64
    out_channels: int = 1
    global_skip: str = "image"
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, lr_up):
        if self.global_skip not in ("image", "feature"):
            raise ValueError(f"global_skip must be 'image' or 'feature', got {self.global_skip!r}")
        conv = lambda f, name: nn.Conv(  # noqa: E731
            f, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=jnp.float32, name=name
        )
        block = nn.remat(ResidualBlock) if self.remat else ResidualBlock
        x = lr_up.astype(self.dtype)
        h0 = conv(self.width, "conv_in")(x)
        h = h0
        for i in range(self.num_blocks):
            h = block(self.width, dtype=self.dtype, name=f"block_{i}")(h)
        if self.global_skip == "feature":
            h = h + h0
        out = conv(self.out_channels, "conv_out")(h).astype(jnp.float32)
        if self.global_skip == "image":
            out = out + lr_up[..., : self.out_channels].astype(jnp.float32)
        return out


MODELS = {"srcnn": SRCNN, "deepsr": DeepSR}


def create_model(config) -> nn.Module:
    """The network a config names (`config.model.name` plus its fields)."""
    m = config.model
    dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    if m.name == "srcnn":
        return SRCNN(out_channels=1, dtype=dtype)
    if m.name == "deepsr":
        return DeepSR(
            num_blocks=m.num_blocks, width=m.width, out_channels=1,
            global_skip=m.global_skip, remat=m.remat, dtype=dtype,
        )
    raise ValueError(f"unknown model {m.name!r}; choose one of {sorted(MODELS)}")


def count_params(params) -> int:
    """Number of scalar parameters in a params pytree."""
    import jax

    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
