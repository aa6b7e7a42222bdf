"""How every convolution of both networks is initialised and built.

The networks take the convolution as a module class, `conv`, called like `flax.linen.Conv`;
`convolve` applies one "SAME", stride-1 convolution with bias made from it, float32 parameters
and the chosen initialisation. Which class computes it (flax's, or a CPU kernel from
`petsr_jax.cpu`) changes how, never what: the parameter tree is the same.

`initializers(init, fan_in)` (config `model.init`):

* `"torch"` (default) — PyTorch's `nn.Conv2d` default, which the paper's authors trained with
  (their code has no init of its own): kernel U(±√(1/fan_in)) (`variance_scaling(1/3, "fan_in",
  "uniform")`), bias U(±1/√fan_in), fan_in = kh·kw·c_in. Each residual block then adds a small
  update to the stream, so DeepSR 20×64 starts near its input: rms(output − input) is 0.5–1.7×
  rms(input) (uniform-noise images, 3 seeds, either skip).
* `"flax"` — flax's default (lecun_normal kernel, zero bias): three times the kernel variance,
  so 20 plain residual blocks grow the stream by orders of magnitude (44–93× rms(input), same
  measurement) and the full DeepSR trains to worse than its own bicubic input. Kept to show it.
* `"srcnn"` — SRCNN's original N(0, 0.001²) kernels and zero bias (Dong et al., 2014).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from petsr_jax.config import INITS  # the values config `model.init` takes, implemented here

ConvModule = Callable[..., nn.Module]


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


def convolve(owner: nn.Module, x, features: int, size: int, name: str):
    """`x` through a `size`×`size` stride-1 "SAME" convolution with bias to `features` channels.

    The layer is made by `owner`'s module class `conv`, computes in `owner.dtype`, keeps float32
    parameters and is initialised by `owner.initialization`: every network and block of the
    package has these three fields, so each of their layers is built the same way. Call it from
    `owner`'s compact method; the layer becomes `owner`'s submodule `name`.
    """
    kernel_init, bias_init = initializers(owner.initialization, size * size * x.shape[-1])
    layer = owner.conv(
        features,
        (size, size),
        padding="SAME",
        dtype=owner.dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        bias_init=bias_init,
        name=name,
    )
    return layer(x)


class ConvNetwork(nn.Module):
    """What every network and block shares with `convolve`: the compute dtype (parameters stay
    float32; bfloat16 on GPUs), the convolution module class (`flax.linen.Conv` or one with its
    signature) and the initialisation (`initializers`)."""

    dtype: Any = jnp.float32
    conv: ConvModule = nn.Conv
    initialization: str = "torch"
