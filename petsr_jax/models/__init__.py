"""The paper's two networks and the one place a config becomes one of them.

`create_model(config)` builds SRCNN or DeepSR with the convolution module `model.conv` names:
flax's `nn.Conv` (`"flax"`), a CPU kernel from
`petsr_jax.cpu` (`"cpu"`, `"onednn"`), or `"auto"`, which `petsr_jax.cpu.resolve_conv` settles
by backend. The choice changes how convolutions are computed, never the parameters, so a
checkpoint trained with one loads with any other.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from petsr_jax.config import CONVS
from petsr_jax.models.anchored import Anchored
from petsr_jax.models.deepsr import DeepSR, ResidualBlock
from petsr_jax.models.layers import INITS, ConvModule, initializers
from petsr_jax.models.srcnn import SRCNN

__all__ = [
    "Anchored",
    "CONVS",
    "INITS",
    "MODELS",
    "DeepSR",
    "ResidualBlock",
    "SRCNN",
    "conv_module",
    "count_params",
    "create_model",
    "initializers",
]

MODELS = {"srcnn": SRCNN, "deepsr": DeepSR}


def conv_module(conv: str = "auto") -> ConvModule:
    """The convolution module class for `model.conv`; `petsr_jax.cpu` loads only when asked."""
    if conv not in CONVS:
        raise ValueError(f"model.conv must be one of {CONVS}, got {conv!r}")
    if conv == "flax":
        return nn.Conv
    from petsr_jax import cpu

    return cpu.conv_module(cpu.resolve_conv(conv))


def create_model(config) -> nn.Module:
    """The network a config names (`config.model.name` plus its fields); with `mr.anchor_block`,
    two of them (`Anchored`): a PET-only one beside the MR-guided one."""
    network = _network(config)
    if config.get("mr", {}).get("anchor_block", 0):
        # The PET-only branch sees the PET slices: the centre and task.context on each side.
        pet_channels = 2 * int(config.get("task", {}).get("context", 0)) + 1
        return Anchored(pet=network, guided=network.clone(), pet_channels=pet_channels)
    return network


def _network(config) -> nn.Module:
    m = config.model
    dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    conv = conv_module(m.get("conv", "auto"))
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
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def abstract_params(model: nn.Module, in_channels: int, placement) -> dict:
    """The shapes and dtypes of a model's params, placed with `placement` (a sharding), without
    running its initialiser: what a checkpoint restore fills in."""
    dummy = jax.ShapeDtypeStruct((1, 16, 16, in_channels), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=placement), shapes
    )
