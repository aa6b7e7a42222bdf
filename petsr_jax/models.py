"""The two super-resolution networks of the paper, as Flax linen modules.

Both map the bicubic-upscaled low-resolution image `lr_up` (NHWC) to the super-resolved image at
the same size, so one network serves every scale. Parameters are float32; `dtype` sets the
compute dtype (bfloat16 on GPUs). `conv` picks how convolutions are computed, not what they
compute: `"xla"` is `flax.linen.Conv`; `"cpu"` is `petsr_jax.fast_conv.Conv` (same parameters,
a backward pass that is faster on XLA:CPU); `"onednn"` is the same module running float32
convolutions in oneDNN (`petsr_jax.onednn`); `create_model` resolves `"auto"` by backend.

`initialization` (config `model.init`) sets how every convolution is initialised, whichever `conv`
computes it:

* `"torch"` (default) — PyTorch's `nn.Conv2d` default, which the paper's authors trained with
  (their code has no init of its own): kernel U(±√(1/fan_in)) (`variance_scaling(1/3, "fan_in",
  "uniform")`), bias U(±1/√fan_in), fan_in = kh·kw·c_in. Each residual block then adds a small
  update to the stream, so DeepSR 20×64 starts near its input: rms(output − input) is 0.5–1.7×
  rms(input) (uniform-noise images, 3 seeds, either skip).
* `"flax"` — flax's default (lecun_normal kernel, zero bias): three times the kernel variance,
  so 20 plain residual blocks grow the stream by orders of magnitude (44–93× rms(input), same
  measurement) and the full DeepSR trains to worse than its own bicubic input. Kept to show it.
* `"srcnn"` — SRCNN's original N(0, 0.001²) kernels and zero bias (Dong et al., 2014).

`residual_scale` multiplies each residual block's branch before it is added (EDSR's 0.1 for
very wide networks); 1.0, the paper's network, leaves it out.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from petsr_jax import fast_conv

CONV_IMPLS = ("xla", "cpu", "onednn")
INITS = ("torch", "flax", "srcnn")


def _uniform(bound: float):
    """U(-bound, bound), as PyTorch's `kaiming_uniform_`/bias init draw."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def initializers(init: str, fan_in: int):
    """(kernel_init, bias_init) of a convolution with `fan_in` = kh·kw·c_in inputs per output."""
    if init == "torch":
        return (
            nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
            _uniform(1 / fan_in**0.5),
        )
    if init == "flax":
        return nn.initializers.lecun_normal(), nn.initializers.zeros_init()
    if init == "srcnn":
        return nn.initializers.normal(0.001), nn.initializers.zeros_init()
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def _conv_layer(
    features: int, size: int, in_channels: int, name: str, dtype: Any, impl: str, init: str
) -> nn.Module:
    """A stride-1 "SAME" convolution with bias, float32 parameters, computed in `dtype`."""
    kernel_init, bias_init = initializers(init, size * size * in_channels)
    common = dict(
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        bias_init=bias_init,
        name=name,
    )
    if impl == "xla":
        return nn.Conv(features, (size, size), padding="SAME", **common)
    if impl in ("cpu", "onednn"):
        return fast_conv.Conv(features, (size, size), impl=impl, **common)
    raise ValueError(f"conv must be one of {CONV_IMPLS}, got {impl!r}")


class SRCNN(nn.Module):
    """Multi-scale SRCNN (paper Sec. 3.1.1): 9×9/64 → ReLU → 1×1/32 → ReLU → 5×5/out.

    "SAME" padding equals the paper's paddings 4 / 0 / 2, which preserve the input size.
    """

    features: tuple[int, int] = (64, 32)
    out_channels: int = 1
    dtype: Any = jnp.float32
    conv: str = "xla"
    initialization: str = "torch"

    @nn.compact
    def __call__(self, lr_up):
        def conv(x, features, size, name):
            layer = _conv_layer(
                features, size, x.shape[-1], name, self.dtype, self.conv, self.initialization
            )
            return layer(x)

        x = lr_up.astype(self.dtype)
        x = nn.relu(conv(x, self.features[0], 9, "patch_extraction"))
        x = nn.relu(conv(x, self.features[1], 1, "nonlinear_mapping"))
        x = conv(x, self.out_channels, 5, "reconstruction")
        return x.astype(jnp.float32)


class ResidualBlock(nn.Module):
    """conv 3×3 → ReLU → conv 3×3, with a skip around it (EDSR-style, no normalisation)."""

    width: int
    dtype: Any = jnp.float32
    conv: str = "xla"
    initialization: str = "torch"
    residual_scale: float = 1.0

    @nn.compact
    def __call__(self, h):
        def conv(name):
            return _conv_layer(
                self.width, 3, self.width, name, self.dtype, self.conv, self.initialization
            )

        branch = conv("conv2")(nn.relu(conv("conv1")(h)))
        if self.residual_scale != 1.0:
            branch = branch * jnp.asarray(self.residual_scale, branch.dtype)
        return h + branch


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
    global_skip: str = "feature"
    remat: bool = False
    dtype: Any = jnp.float32
    conv: str = "xla"
    initialization: str = "torch"
    residual_scale: float = 1.0

    @nn.compact
    def __call__(self, lr_up):
        if self.global_skip not in ("image", "feature"):
            raise ValueError(f"global_skip must be 'image' or 'feature', got {self.global_skip!r}")

        def conv(x, features, name):
            layer = _conv_layer(
                features, 3, x.shape[-1], name, self.dtype, self.conv, self.initialization
            )
            return layer(x)

        block = nn.remat(ResidualBlock) if self.remat else ResidualBlock
        x = lr_up.astype(self.dtype)
        h0 = conv(x, self.width, "conv_in")
        h = h0
        for i in range(self.num_blocks):
            h = block(
                self.width,
                dtype=self.dtype,
                conv=self.conv,
                initialization=self.initialization,
                residual_scale=self.residual_scale,
                name=f"block_{i}",
            )(h)
        if self.global_skip == "feature":
            h = h + h0
        out = conv(h, self.out_channels, "conv_out").astype(jnp.float32)
        if self.global_skip == "image":
            out = out + lr_up[..., : self.out_channels].astype(jnp.float32)
        return out


MODELS = {"srcnn": SRCNN, "deepsr": DeepSR}


def resolve_conv(conv: str = "auto", backend: str | None = None, devices: int | None = None) -> str:
    """The convolution implementation for `conv`; "auto" picks the fastest for the backend.

    GPUs: "xla" (cuDNN-backed convolutions and gradients; the CPU paths would only add risk).
    CPUs: "onednn" when its library builds here and the process computes on one device — the
    custom call has no partitioning rule, so with several devices XLA would gather the batch
    onto each —, else "cpu". `devices` defaults to `jax.device_count()`.
    """
    if conv not in ("auto", *CONV_IMPLS):
        raise ValueError(f"model.conv must be 'auto' or one of {CONV_IMPLS}, got {conv!r}")
    if conv != "auto":
        return conv
    if (backend or jax.default_backend()) != "cpu":
        return "xla"
    from petsr_jax import onednn

    one_device = (jax.device_count() if devices is None else devices) == 1
    return "onednn" if one_device and onednn.available() else "cpu"


def create_model(config) -> nn.Module:
    """The network a config names (`config.model.name` plus its fields)."""
    m = config.model
    dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    conv = resolve_conv(m.get("conv", "auto"))
    if m.name == "srcnn":
        return SRCNN(out_channels=1, dtype=dtype, conv=conv, initialization=m.init)
    if m.name == "deepsr":
        return DeepSR(
            num_blocks=m.num_blocks,
            width=m.width,
            out_channels=1,
            global_skip=m.global_skip,
            remat=m.remat,
            dtype=dtype,
            conv=conv,
            initialization=m.init,
            residual_scale=m.residual_scale,
        )
    raise ValueError(f"unknown model {m.name!r}; choose one of {sorted(MODELS)}")


def count_params(params) -> int:
    """Number of scalar parameters in a params pytree."""
    import jax

    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
